//! Each fuzz target's body, one function a target: the binaries in
//! `fuzz_targets/` are one line each, and `tests/seeds.rs` runs every seed
//! through the same functions without cargo-fuzz.

use std::io::Cursor;
use std::sync::Mutex;

use husk_image::unpack::Limits;
use husk_protocol::agent::{
    Forward, Hello, Output, Request, Response, StdioAttach, frame, read_frame, read_output,
    write_output,
};
use husk_vmm::devices::virtio::mmio::MmioTransport;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::Input;
use crate::devices::{self, Kind};
use crate::scratch::Scratch;
use crate::virtq::Guest;

/// The process's scratch directory of this name, made on first use and
/// removed when the process exits normally (the fuzz script sweeps what
/// a crash leaves).
pub fn scratch(name: &'static str) -> &'static Scratch {
    static ALL: Mutex<Vec<(&'static str, &'static Scratch)>> = Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        if let Ok(all) = ALL.try_lock() {
            for (_, s) in all.iter() {
                let _ = std::fs::remove_dir_all(s.root());
            }
        }
    }
    let mut all = ALL.lock().unwrap();
    if let Some((_, s)) = all.iter().find(|(n, _)| *n == name) {
        return s;
    }
    if all.is_empty() {
        // SAFETY: atexit only records the function; `remove_all` touches
        // nothing that process exit has torn down (a static and the
        // file system).
        unsafe { libc::atexit(remove_all) };
    }
    let s: &'static Scratch = Box::leak(Box::new(Scratch::new(name)));
    all.push((name, s));
    s
}

/// A virtio device's queues driven by a guest program ([`crate::virtq`]).
/// The first byte: bit 0, the driver accepts every feature offered (else
/// VERSION_1 alone); bit 1, a virtio-fs share is read-only. The driver is
/// started as Linux starts it, then the program runs.
pub fn device(kind: Kind, data: &[u8]) {
    let scratch = scratch("device");
    if kind == Kind::Fs {
        scratch.reset();
        devices::fill_share(scratch);
    }
    let mut input = Input::new(data);
    let flags = input.u8();
    let made = devices::make(kind, scratch, flags & 2 != 0);
    let mut guest = Guest::new(made.device);
    let mut host = made.host;
    guest.bring_up(flags & 1 != 0);
    guest.run(&mut input, host.as_mut());
    drop(host);
    drop(guest);
    scratch.check();
}

/// The virtio-mmio transport's registers: the first byte picks the device
/// (rng, vsock, net, fs), then a guest program runs with no driver
/// started for it (the program writes the registers itself). The
/// transport is then saved and restored onto a new device of its kind
/// with the same memory, as a snapshot would be; for rng and net (no
/// state of their own beyond the transport's) the restored transport
/// must save the same state again.
pub fn mmio(data: &[u8]) {
    let scratch = scratch("mmio");
    let mut input = Input::new(data);
    let kind = Kind::from_byte(input.u8());
    if kind == Kind::Fs {
        scratch.reset();
        devices::fill_share(scratch);
    }
    let made = devices::make(kind, scratch, false);
    let mut guest = Guest::new(made.device);
    let mut host = made.host;
    guest.run(&mut input, host.as_mut());
    let saved = guest.transport.lock().unwrap().save();
    let mem = guest.mem.clone();
    drop(host);
    drop(guest);
    if let Ok(state) = saved {
        let fresh = devices::make(kind, scratch, false);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let restored = MmioTransport::restore(fresh.device, mem, irq, &state);
        if matches!(kind, Kind::Rng | Kind::Net) {
            let mut restored = restored.expect("a transport's own saved state restores");
            assert_eq!(
                restored.save().expect("save"),
                state,
                "a restored transport is the one saved"
            );
            restored.settle_after_restore();
        } else if let Ok(mut restored) = restored {
            restored.settle_after_restore();
        }
    }
    scratch.check();
}

/// A snapshot directory's `state` file, read by `husk_vmm::snapshot::read`
/// beside a 2 MiB memory file; each virtio device it describes is then
/// restored, as the VMM restores it, onto a new device of its type with
/// up to 16 MiB of guest memory, and settled. The first byte: even, the
/// rest is the whole state file; odd, the rest is the state's body and
/// the harness writes a header with its checksum (which a fuzzer could
/// not find) for this Husk version.
pub fn snapshot(data: &[u8]) {
    use husk_vmm::snapshot::{FORMAT, HUSK_VERSION, MEMORY_FILE, STATE_FILE, VERSION, read};
    const MEMORY: u64 = 2 << 20;
    let scratch = scratch("snapshot");
    scratch.reset();
    let dir = scratch.harness().join("snap");
    let _ = std::fs::create_dir(&dir);
    let mut input = Input::new(data);
    let mode = input.u8();
    let body = input.rest();
    let state = if mode % 2 == 0 {
        body.to_vec()
    } else {
        let header = serde_json::json!({
            "format": FORMAT,
            "version": VERSION,
            "husk_version": HUSK_VERSION,
            "checksum": crc32fast::hash(body),
            "memory_bytes": MEMORY,
        });
        let mut state = serde_json::to_vec(&header).unwrap();
        state.push(b'\n');
        state.extend_from_slice(body);
        state
    };
    std::fs::write(dir.join(STATE_FILE), state).expect("state file");
    std::fs::File::create(dir.join(MEMORY_FILE))
        .and_then(|f| f.set_len(MEMORY))
        .expect("memory file");
    if let Ok((state, _)) = read(&dir)
        && (1..=16).contains(&state.memory_mib)
    {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(0),
            (state.memory_mib << 20) as usize,
        )])
        .expect("guest memory");
        devices::fill_share(scratch);
        for slot in state.virtio.iter().take(8) {
            let Some(kind) = Kind::of_type(slot.transport.device_type) else {
                continue;
            };
            let made = devices::make(kind, scratch, false);
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            if let Ok(mut t) =
                MmioTransport::restore(made.device, mem.clone(), irq, &slot.transport)
            {
                t.settle_after_restore();
            }
        }
    }
    scratch.check();
}

/// A checkpoint's `checkpoint.json`, read by
/// `husk_runtime::checkpoint::open` for container `fuzz`. The first byte:
/// bit 0, the checkpoint has its `upper/` directory.
pub fn checkpoint(data: &[u8]) {
    let scratch = scratch("checkpoint");
    scratch.reset();
    let dir = scratch.work();
    let mut input = Input::new(data);
    if input.u8() & 1 != 0 {
        std::fs::create_dir(dir.join(husk_runtime::checkpoint::UPPER_DIR)).expect("upper");
    }
    std::fs::write(dir.join(husk_runtime::checkpoint::MANIFEST), input.rest()).expect("manifest");
    if let Ok((_, manifest)) = husk_runtime::checkpoint::open(&dir, "fuzz") {
        assert_eq!(manifest.id, "fuzz");
    }
    scratch.check();
}

/// A bundle's `config.json`, loaded and checked as `husk create` does
/// (`husk_runtime::bundle::Bundle::load`, with a `rootfs` directory
/// beside it), then the process the agent would get, the VM's shape and
/// the refusal of hooks that would run in the guest.
pub fn oci_config(data: &[u8]) {
    let scratch = scratch("oci");
    let dir = scratch.work();
    if !dir.join("rootfs").is_dir() {
        std::fs::create_dir(dir.join("rootfs")).expect("rootfs");
    }
    std::fs::write(dir.join("config.json"), data).expect("config.json");
    if let Ok(bundle) = husk_runtime::bundle::Bundle::load(&dir) {
        let _ = bundle.process();
        let resources = bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let _ = husk_guest::shape::Shape::on_host(resources, 2);
        let _ = husk_runtime::hooks::refuse_guest_hooks(&bundle.spec);
    }
    scratch.check();
}

/// An image's JSON as a registry or an archive hands it over: taken as an
/// index (`is_index`, `select_platform`), a manifest (`manifest_blobs`), a
/// config (parsed, its platform and diff IDs read as `record` reads
/// them), and as text, an image reference.
pub fn image_json(data: &[u8]) {
    let _ = husk_image::is_index(None, data);
    let _ = husk_image::select_platform("fuzz", data);
    let _ = husk_image::manifest_blobs("fuzz", data);
    if let Ok(config) = oci_spec::image::ImageConfiguration::from_reader(data) {
        let _ = (
            config.os(),
            config.architecture(),
            config.rootfs().diff_ids().len(),
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = husk_image::reference::Reference::parse(text) {
            let _ = (r.name(), r.manifest_ref(), r.short_name(), r.to_string());
        }
        let _ = husk_image::reference::digest_ok(text);
    }
}

/// The limits the unpacking targets run under: small, so that a bomb is
/// refused in milliseconds.
fn limits() -> Limits {
    Limits {
        max_bytes: 16 << 20,
        max_entries: 10_000,
        max_header_bytes: 64 << 10,
    }
}

/// A layer blob (gzip, zstd or tar) through `husk_image::unpack::unpack_layer`
/// into the fenced scratch directory, which must hold everything it made;
/// when it unpacks, its diff ID must be the one `diff_id` computes
/// without unpacking.
pub fn layer_unpack(data: &[u8]) {
    let scratch = scratch("unpack");
    scratch.reset();
    let unpacked = husk_image::unpack::unpack_layer(data, &scratch.work(), limits());
    scratch.check();
    if let Ok(unpacked) = unpacked {
        let diff_id = husk_image::unpack::diff_id(data, limits()).expect("the layer was read once");
        assert_eq!(unpacked, diff_id, "one layer, two diff IDs");
    }
}

/// An image archive (`docker save` or an OCI layout, as a tar file)
/// loaded by `husk_image::archive::load` into a new store in the fenced
/// scratch directory.
pub fn image_archive(data: &[u8]) {
    let scratch = scratch("archive");
    scratch.reset();
    let archive = scratch.harness().join("archive.tar");
    std::fs::write(&archive, data).expect("archive");
    husk_image::unpack::Limits::set(limits());
    if let Ok(store) = husk_image::store::Store::open(&scratch.work().join("store")) {
        let _ = husk_image::archive::load(&store, &archive);
    }
    scratch.check();
}

/// What the agent reads from the host, decoded as the agent decodes it:
/// frames of requests (the control connection), stdio attaches, port
/// forwards and hellos. A request that decodes must encode and decode to
/// itself.
pub fn agent_frames(data: &[u8]) {
    let mut c = Cursor::new(data);
    while let Ok(request) = read_frame::<_, Request>(&mut c) {
        let again = read_frame::<_, Request>(&mut Cursor::new(frame(&request).unwrap()));
        assert_eq!(again.ok(), Some(request), "a request survives its encoding");
    }
    let _ = read_frame::<_, StdioAttach>(&mut Cursor::new(data));
    let _ = read_frame::<_, Forward>(&mut Cursor::new(data));
    let _ = read_frame::<_, Hello>(&mut Cursor::new(data));
}

/// What the host reads from the agent, decoded as the runtime decodes it:
/// the agent's hello, frames of responses, and an exec's inline output
/// records. What decodes must encode and decode to itself.
pub fn host_frames(data: &[u8]) {
    let _ = husk_protocol::agent::hear_greeting(&mut Cursor::new(data));
    let mut c = Cursor::new(data);
    while let Ok(response) = read_frame::<_, Response>(&mut c) {
        let again = read_frame::<_, Response>(&mut Cursor::new(frame(&response).unwrap()));
        assert_eq!(
            again.ok(),
            Some(response),
            "a response survives its encoding"
        );
    }
    let mut c = Cursor::new(data);
    while let Ok(record) = read_output(&mut c) {
        let mut bytes = Vec::new();
        write_output(&mut bytes, &record).expect("a record read is one that can be written");
        let again: Output = read_output(&mut Cursor::new(bytes)).expect("reads back");
        assert_eq!(again, record, "a record survives its encoding");
    }
}

/// A Dockerfile, as `husk build` reads one from a context (a pull
/// request's, a sandbox user's): read into stages and steps, every step's
/// raw words through the lexer with some variables set, the target's
/// stages found; the same bytes as a `.dockerignore`, matched against a
/// few paths. Nothing here may panic or loop.
pub fn dockerfile(data: &[u8]) {
    use husk_build::dockerfile::Kind;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: husk_build::lex::Vars = [("A", "x"), ("EMPTY", "")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(file) = husk_build::dockerfile::parse(text) {
        let _ = file.stages_for(None);
        let _ = file.stages_for(Some("0"));
        for stage in &file.stages {
            for step in &stage.steps {
                let raw = match &step.kind {
                    Kind::Workdir(w) | Kind::User(w) | Kind::Expose(w) | Kind::StopSignal(w) => {
                        w.clone()
                    }
                    Kind::Env(pairs) | Kind::Label(pairs) => pairs
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    _ => step.text.clone(),
                };
                let _ = husk_build::lex::word(&raw, file.escape, &vars);
                let _ = husk_build::lex::words(&raw, file.escape, &vars);
            }
        }
    }
    let _ = husk_build::lex::word(text, '\\', &vars);
    let _ = husk_build::lex::raw_words(text, '`');
    if let Ok(ignore) = husk_build::ignore::Ignore::parse(text) {
        for path in ["a", "a/b/c", "Dockerfile", ".dockerignore", "x/y.log"] {
            let _ = ignore.excludes(path);
            let _ = ignore.may_include_below(path);
        }
    }
}
