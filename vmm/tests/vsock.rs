//! Hybrid vsock on a real guest: the host connects to the VMM's Unix
//! socket, asks for a guest port, and streams data through the guest's
//! echo listener and back, byte-exact, with vsock flow control in between.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::{Scratch, kernel, read_line_unbuffered, spawn_vmm, test_initramfs};

/// Connects and sends the CONNECT line; returns the stream and the answer.
fn connect(socket: &std::path::Path, line: &str) -> (UnixStream, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let answer = read_line_unbuffered(&mut stream).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    (stream, answer)
}

#[test]
fn host_and_guest_stream_through_hybrid_vsock() {
    let scratch = Scratch::new("vsock");
    let initramfs = test_initramfs(&scratch);
    let socket = scratch.path("vsock.sock");
    let (mut child, lines) = spawn_vmm(&[
        "--kernel".as_ref(),
        kernel().as_os_str(),
        "--initramfs".as_ref(),
        initramfs.as_os_str(),
        "--cmdline=-- vsock-echo".as_ref(),
        "--vsock-socket".as_ref(),
        socket.as_os_str(),
    ]);
    let wait_for = |want: &str| loop {
        let line = lines
            .recv_timeout(common::BOOT_TIMEOUT)
            .unwrap_or_else(|_| panic!("the guest never printed {want:?}"));
        if line.contains(want) {
            return line;
        }
    };
    wait_for("husk-test-init: vsock listening on 1234");

    // A client that does not say CONNECT is told so.
    let (_, answer) = connect(&socket, "HELLO\n");
    assert_eq!(answer, "ERROR expected CONNECT <port>\n");
    // A port nobody listens on: the guest resets, the client sees the end.
    let (_, answer) = connect(&socket, "CONNECT 4321\n");
    assert_eq!(answer, "");

    let (stream, answer) = connect(&socket, "CONNECT 1234\n");
    assert!(answer.starts_with("OK "), "{answer:?}");
    // 4 MiB each way at once: more than the guest's or the VMM's buffers,
    // so it only completes if credit updates flow both ways.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let feeder = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    (&stream).read_to_end(&mut back).unwrap();
    feeder.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");

    let verdict = wait_for("husk-test-init: vsock ");
    assert_eq!(
        verdict,
        format!("husk-test-init: vsock echoed {} bytes", data.len())
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the VMM left its vsock socket behind");
}
