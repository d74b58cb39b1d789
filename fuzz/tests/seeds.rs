//! The seed corpus: valid inputs for every target, made here from the
//! real types and formats so that they stay valid as those change.
//!
//! `cargo test --manifest-path fuzz/Cargo.toml` runs every seed, and every
//! file kept under `corpus/` (the regression inputs of crashes fixed),
//! through its target's function without cargo-fuzz; with
//! `HUSK_FUZZ_WRITE_SEEDS=1` it first (re)writes `corpus/<target>/seed-*`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use husk_fuzz::devices::{Kind, VSOCK_SERVICE_PORT};
use husk_fuzz::seeds::{Desc, Program, fuse, vsock_packet};
use husk_fuzz::targets;
use husk_fuzz::virtq::Guest;
use husk_protocol::agent::{
    CloneSeed, Forward, Hello, Output, PROTOCOL_VERSION, Process, Request, Response, Stats,
    StdioAttach, Stream, frame, write_output,
};

type Seeds = BTreeMap<&'static str, Vec<(String, Vec<u8>)>>;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn add(seeds: &mut Seeds, target: &'static str, name: &str, bytes: Vec<u8>) {
    seeds
        .entry(target)
        .or_default()
        .push((format!("seed-{name}"), bytes));
}

const RX: u8 = 0;
const TX: u8 = 1;

fn rng(seeds: &mut Seeds) {
    let mut p = Program::new(&[0]);
    p.chain(0, &[Desc::Write(64)])
        .chain(0, &[Desc::Write(16), Desc::Write(4096)])
        .notify(0);
    add(seeds, "virtio_rng", "buffers", p.bytes());
    // A readable buffer among writable ones: the device skips it.
    let mut p = Program::new(&[1]);
    p.chain(0, &[Desc::Read(vec![1, 2, 3]), Desc::Write(32)])
        .notify(0);
    add(seeds, "virtio_rng", "mixed", p.bytes());
}

// vsock packet operations.
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;

fn vsock_tx(p: &mut Program, packet: Vec<u8>) {
    p.chain(TX, &[Desc::Read(packet)]).notify(TX);
}

fn rx_buffers(p: &mut Program, n: usize) {
    for _ in 0..n {
        p.chain(RX, &[Desc::Write(4096)]);
    }
    p.notify(RX);
}

fn vsock_programs() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let service = VSOCK_SERVICE_PORT;
    // The guest connects to the host service, sends, reads the host's
    // answer, then shuts down and resets.
    let mut p = Program::new(&[1]);
    rx_buffers(&mut p, 4);
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_REQUEST, 0, 65536, 0, &[]),
    );
    p.tick();
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_RW, 0, 65536, 0, b"hello host"),
    );
    p.host(&[5]) // accept the service's connection
        .host(&[2, 0, 1, 0]) // read what the guest sent
        .host(&[1, 5, 0, b'w', b'o', b'r', b'l', b'd', 0]) // write back
        .tick();
    rx_buffers(&mut p, 2);
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_CREDIT_UPDATE, 0, 65536, 5, &[]),
    );
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_CREDIT_REQUEST, 0, 65536, 5, &[]),
    );
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_SHUTDOWN, 3, 65536, 5, &[]),
    );
    vsock_tx(
        &mut p,
        vsock_packet(1234, service, OP_RST, 0, 65536, 5, &[]),
    );
    p.tick();
    out.push(("guest-connects", p.bytes()));
    // A host client connects to guest port 1024; the guest accepts and
    // data flows both ways.
    let mut p = Program::new(&[1]);
    rx_buffers(&mut p, 4);
    p.host(&[0, 0, 4, 0, 0]).tick();
    vsock_tx(
        &mut p,
        vsock_packet(1024, 1 << 30, OP_RESPONSE, 0, 65536, 0, &[]),
    );
    p.host(&[1, 3, 0, b'a', b'b', b'c', 0]).tick();
    rx_buffers(&mut p, 2);
    vsock_tx(
        &mut p,
        vsock_packet(1024, 1 << 30, OP_RW, 0, 65536, 3, b"xyz"),
    );
    p.host(&[2, 16, 0, 0]).host(&[3, 0]).tick();
    p.host(&[4, 0]).tick();
    out.push(("host-connects", p.bytes()));
    // The ready port, a connection to a port nobody serves, and data on
    // no connection.
    let mut p = Program::new(&[0]);
    rx_buffers(&mut p, 3);
    vsock_tx(
        &mut p,
        vsock_packet(77, husk_protocol::READY_PORT, OP_REQUEST, 0, 4096, 0, &[]),
    );
    vsock_tx(&mut p, vsock_packet(78, 9999, OP_REQUEST, 0, 4096, 0, &[]));
    vsock_tx(&mut p, vsock_packet(79, 9999, OP_RW, 0, 4096, 0, b"nobody"));
    p.tick();
    out.push(("ready-and-refused", p.bytes()));
    out
}

fn vsock(seeds: &mut Seeds) {
    for (name, bytes) in vsock_programs() {
        add(seeds, "virtio_vsock", name, bytes);
    }
}

/// A frame for the TAP or from it: the 12-byte virtio header, then an
/// Ethernet frame of `len` bytes.
fn net_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend([0xff; 6]); // destination
    f.extend([0x02, 0, 0, 0, 0, 1]); // source
    f.extend([0x08, 0x00]); // IPv4
    f.extend((0..len.saturating_sub(14)).map(|i| i as u8));
    f
}

fn net(seeds: &mut Seeds) {
    for (flags, name) in [(1u8, "merged"), (0, "plain")] {
        let mut p = Program::new(&[flags]);
        p.chain(TX, &[Desc::Read(net_frame(60))])
            .chain(
                TX,
                &[
                    Desc::Read(net_frame(12)[..12].to_vec()),
                    Desc::Read(net_frame(1500)),
                ],
            )
            .notify(TX);
        for _ in 0..4 {
            p.chain(RX, &[Desc::Write(2048)]);
        }
        p.notify(RX);
        let mut op = vec![0u8];
        let frame = net_frame(3000);
        op.extend((frame.len() as u16).to_le_bytes());
        op.extend(&frame);
        p.host(&op).tick();
        let mut op = vec![0u8];
        let frame = net_frame(100);
        op.extend((frame.len() as u16).to_le_bytes());
        op.extend(&frame);
        p.host(&op).tick().host(&[1]);
        add(seeds, "virtio_net", name, p.bytes());
    }
}

// FUSE opcodes.
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const ACCESS: u32 = 34;
const CREATE: u32 = 35;
const DESTROY: u32 = 38;
const FALLOCATE: u32 = 43;
const READDIRPLUS: u32 = 44;
const RENAME2: u32 = 45;
const LSEEK: u32 = 46;

const REQ: u8 = 1;
const HIPRIO: u8 = 0;

fn cname(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

fn le(parts: &[u64], widths: &[usize]) -> Vec<u8> {
    parts
        .iter()
        .zip(widths)
        .flat_map(|(v, w)| v.to_le_bytes()[..*w].to_vec())
        .collect()
}

struct Fuse {
    p: Program,
    unique: u64,
}

impl Fuse {
    fn new(flags: u8) -> Self {
        let mut f = Self {
            p: Program::new(&[flags]),
            unique: 0,
        };
        // fuse_init_in: major, minor, max_readahead, flags, flags2, unused.
        let mut init = le(&[7, 38, 131072, 0xffff_ffff, 0], &[4, 4, 4, 4, 4]);
        init.extend([0u8; 44]);
        f.req(INIT, 0, init);
        f
    }

    fn req(&mut self, opcode: u32, node: u64, args: Vec<u8>) -> &mut Self {
        self.unique += 1;
        let queue = if opcode == FORGET { HIPRIO } else { REQ };
        let reply = if opcode == FORGET {
            vec![]
        } else {
            vec![Desc::Write(8192)]
        };
        let mut descs = vec![Desc::Read(fuse(opcode, self.unique, node, &args))];
        descs.extend(reply);
        self.p.chain(queue, &descs).notify(queue);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        self.p.bytes()
    }
}

fn fs(seeds: &mut Seeds) {
    // Nodes are numbered from 2 in the order the guest meets them, and
    // handles from 1 (the session's numbering).
    let mut f = Fuse::new(0);
    f.req(LOOKUP, 1, cname("f")) // node 2
        .req(GETATTR, 2, vec![0; 16])
        .req(OPEN, 2, le(&[libc::O_RDWR as u64, 0], &[4, 4])) // handle 1
        .req(
            READ,
            2,
            le(&[1, 0, 100, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
        )
        .req(
            WRITE,
            2,
            [
                le(&[1, 0, 5, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
                b"hello".to_vec(),
            ]
            .concat(),
        )
        .req(FLUSH, 2, le(&[1, 0, 0, 0], &[8, 4, 4, 8]))
        .req(LSEEK, 2, le(&[1, 0, 3, 0], &[8, 8, 4, 4]))
        .req(FALLOCATE, 2, le(&[1, 0, 4096, 0, 0], &[8, 8, 8, 4, 4]))
        .req(RELEASE, 2, le(&[1, 0, 0, 0], &[8, 4, 4, 8]))
        .req(STATFS, 1, vec![])
        .req(ACCESS, 1, le(&[4, 0], &[4, 4]));
    add(seeds, "virtio_fs", "file", f.bytes());

    let mut f = Fuse::new(0);
    f.req(
        MKDIR,
        1,
        [le(&[0o755, 0o022], &[4, 4]), cname("new")].concat(),
    ) // node 2
    .req(
        CREATE,
        2,
        [
            le(&[libc::O_RDWR as u64, 0o644, 0o022, 0], &[4, 4, 4, 4]),
            cname("c"),
        ]
        .concat(),
    ) // node 3, handle 1
    .req(SYMLINK, 2, [cname("s"), cname("../../sentinel")].concat()) // node 4
    .req(READLINK, 4, vec![])
    .req(LINK, 2, [le(&[3], &[8]), cname("hard")].concat())
    .req(
        MKNOD,
        2,
        [
            le(&[libc::S_IFREG as u64 | 0o600, 0, 0o022, 0], &[4, 4, 4, 4]),
            cname("n"),
        ]
        .concat(),
    )
    .req(
        RENAME2,
        1,
        [le(&[2, 0, 0], &[8, 4, 4]), cname("f"), cname("moved")].concat(),
    )
    .req(OPENDIR, 2, le(&[0, 0], &[4, 4])) // handle 2
    .req(
        READDIR,
        2,
        le(&[2, 0, 4096, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    )
    .req(
        READDIRPLUS,
        2,
        le(&[2, 0, 4096, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    )
    .req(RELEASEDIR, 2, le(&[2, 0, 0, 0], &[8, 4, 4, 8]))
    .req(UNLINK, 2, cname("hard"))
    .req(LOOKUP, 2, cname(".."))
    .req(LOOKUP, 1, cname(".."))
    .req(RMDIR, 1, cname("d"))
    .req(FORGET, 3, le(&[1], &[8]))
    .req(DESTROY, 0, vec![]);
    add(seeds, "virtio_fs", "tree", f.bytes());

    // setattr_in: valid, padding, fh, size, lock_owner, atime, mtime,
    // ctime, atimensec, mtimensec, ctimensec, mode, unused4, uid, gid,
    // unused5.
    let setattr = le(
        &[1 << 3 | 1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0],
        &[4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
    );
    let mut f = Fuse::new(2); // read-only share
    f.req(LOOKUP, 1, cname("up"))
        .req(READLINK, 2, vec![])
        .req(OPEN, 2, le(&[libc::O_WRONLY as u64, 0], &[4, 4]))
        .req(LOOKUP, 1, cname("f"))
        .req(SETATTR, 3, setattr)
        .req(LOOKUP, 1, cname("d"))
        .req(LOOKUP, 4, cname("dotdot"));
    add(seeds, "virtio_fs", "read-only", f.bytes());
}

fn mmio(seeds: &mut Seeds) {
    use husk_vmm::devices::virtio::mmio::*;
    for (kind, name, features, sizes) in [
        (0u8, "rng", 1u64 << 32, vec![64u16]),
        (1, "vsock", 1 << 32, vec![64, 64, 64]),
        (2, "net", (1 << 32) | 0xffff, vec![64, 64]),
        (3, "fs", 1 << 32, vec![64, 64]),
    ] {
        let mut p = Program::new(&[kind]);
        p.read_reg(REG_MAGIC)
            .read_reg(REG_VERSION)
            .read_reg(REG_DEVICE_ID)
            .bring_up(features, &sizes)
            .read_reg(REG_CONFIG)
            .read_reg(REG_CONFIG + 4)
            .read_reg(REG_INTERRUPT_STATUS);
        p.chain(0, &[Desc::Write(64)]).notify(0);
        p.write_reg(REG_INTERRUPT_ACK, 1);
        // A reset, then a driver that sets FEATURES_OK with a feature
        // never offered, and one that skips FEATURES_OK.
        p.write_reg(REG_STATUS, 0)
            .write_reg(REG_DRIVER_FEATURES_SEL, 0)
            .write_reg(REG_DRIVER_FEATURES, 1 << 30)
            .write_reg(REG_STATUS, 1 | 2 | 8)
            .write_reg(REG_STATUS, 1 | 2 | 4)
            .write_reg(REG_STATUS, 0)
            .bring_up(features, &sizes);
        add(seeds, "mmio", name, p.bytes());
    }
}

fn fs_state_program() -> Vec<u8> {
    let mut f = Fuse::new(0);
    f.req(LOOKUP, 1, cname("d"))
        .req(LOOKUP, 2, cname("g"))
        .req(OPEN, 3, le(&[libc::O_RDONLY as u64, 0], &[4, 4]))
        .req(OPENDIR, 2, le(&[0, 0], &[4, 4]));
    f.bytes()
}

/// Transport states as a running device leaves them, from the harness's
/// own guests.
fn transport_states() -> Vec<husk_vmm::devices::virtio::mmio::MmioState> {
    use husk_fuzz::Input;
    use husk_fuzz::devices;
    let scratch = husk_fuzz::scratch::Scratch::new("seed-states");
    let vsock = vsock_programs().remove(0).1;
    let mut states = Vec::new();
    for (kind, program) in [
        (
            Kind::Rng,
            Program::new(&[0])
                .chain(0, &[Desc::Write(8)])
                .notify(0)
                .bytes(),
        ),
        (Kind::Vsock, vsock),
        (Kind::Net, Program::new(&[1]).bytes()),
        (Kind::Fs, fs_state_program()),
    ] {
        scratch.reset();
        devices::fill_share(&scratch);
        let mut input = Input::new(&program);
        let flags = input.u8();
        let made = devices::make(kind, &scratch, false);
        let mut guest = Guest::new(made.device);
        let mut host = made.host;
        guest.bring_up(flags & 1 != 0);
        // The vsock program ends with a reset of its connection; keep it
        // open for the state.
        let keep = if kind == Kind::Vsock {
            program.len() * 2 / 3
        } else {
            program.len()
        };
        let mut input = Input::new(&program[1..keep.max(1)]);
        guest.run(&mut input, host.as_mut());
        states.push(guest.transport.lock().unwrap().save().expect("save"));
    }
    states
}

fn snapshot(seeds: &mut Seeds) {
    use husk_vmm::snapshot::*;
    use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
    let virtio = transport_states()
        .into_iter()
        .enumerate()
        .map(|(i, transport)| VirtioSlot {
            base: 0xc000_0000 + 0x1000 * i as u64,
            gsi: 5 + i as u32,
            share_tag: (transport.device_type == 26).then(|| "rootfs".to_owned()),
            net_slot: (transport.device_type == 1).then_some(0),
            transport,
        })
        .collect();
    let state = VmState {
        memory_mib: 2,
        cmdline: "console=ttyS0".into(),
        vcpus: Vec::new(),
        irqchips: vec![kvm_irqchip::default(); 3],
        pit: kvm_pit_state2::default(),
        clock: kvm_clock_data::default(),
        serial: SerialRegs::default(),
        virtio,
    };
    let body = serde_json::to_vec(&state).unwrap();
    let mut seed = vec![1u8];
    seed.extend(&body);
    add(seeds, "snapshot", "devices", seed);
    // The whole file, header and all, as the VMM writes it.
    let header = serde_json::json!({
        "format": FORMAT,
        "version": VERSION,
        "husk_version": HUSK_VERSION,
        "checksum": crc32fast::hash(&body),
        "memory_bytes": 2u64 << 20,
    });
    let mut seed = vec![0u8];
    seed.extend(serde_json::to_vec(&header).unwrap());
    seed.push(b'\n');
    seed.extend(&body);
    add(seeds, "snapshot", "file", seed);
}

fn checkpoint(seeds: &mut Seeds) {
    let manifest = |version: &str, id: &str, upper: bool| {
        serde_json::to_vec_pretty(&serde_json::json!({
            "format": "husk-checkpoint",
            "husk_version": version,
            "id": id,
            "created": "2026-01-01T00:00:00Z",
            "shape": { "vcpus": 1, "memory_mib": 256 },
            "upper": upper,
        }))
        .unwrap()
    };
    let ours = husk_vmm::snapshot::HUSK_VERSION;
    add(
        seeds,
        "checkpoint",
        "plain",
        [vec![0], manifest(ours, "fuzz", false)].concat(),
    );
    add(
        seeds,
        "checkpoint",
        "upper",
        [vec![1], manifest(ours, "fuzz", true)].concat(),
    );
    add(
        seeds,
        "checkpoint",
        "lost-upper",
        [vec![0], manifest(ours, "fuzz", true)].concat(),
    );
    add(
        seeds,
        "checkpoint",
        "other",
        [vec![0], manifest("0.0.1", "other", false)].concat(),
    );
}

fn oci_config(seeds: &mut Seeds) {
    let spec = husk_runtime::bundle::default_spec();
    add(seeds, "oci_config", "default", spec.clone().into_bytes());
    let mut v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    v["root"] = serde_json::json!({ "path": "rootfs", "readonly": true });
    v["process"]["user"] = serde_json::json!({ "uid": 1000, "gid": 1000, "additionalGids": [5] });
    v["linux"]["resources"] = serde_json::json!({
        "memory": { "limit": 536870912, "swap": -1 },
        "cpu": { "quota": 150000, "period": 100000 },
        "pids": { "limit": 100 },
    });
    v["hooks"] = serde_json::json!({
        "prestart": [{ "path": "/bin/true", "args": ["true"] }],
        "startContainer": [{ "path": "/bin/true" }],
    });
    v["mounts"] = serde_json::json!([
        { "destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"] },
    ]);
    add(
        seeds,
        "oci_config",
        "full",
        serde_json::to_vec_pretty(&v).unwrap(),
    );
}

const AMD64_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const CONFIG_DIGEST: &str =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn image_json(seeds: &mut Seeds) {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": AMD64_DIGEST.replace('1', "3"), "size": 500,
              "platform": { "architecture": "arm64", "os": "linux", "variant": "v8" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": AMD64_DIGEST, "size": 500,
              "platform": { "architecture": "amd64", "os": "linux" } },
        ],
    });
    add(
        seeds,
        "image_json",
        "index",
        serde_json::to_vec(&index).unwrap(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "digest": CONFIG_DIGEST, "size": 100 },
        "layers": [
            { "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": AMD64_DIGEST, "size": 1234 },
        ],
    });
    add(
        seeds,
        "image_json",
        "manifest",
        serde_json::to_vec(&manifest).unwrap(),
    );
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/", "User": "1:1",
                    "ExposedPorts": { "80/tcp": {} }, "Labels": { "a": "b" } },
        "rootfs": { "type": "layers", "diff_ids": [AMD64_DIGEST] },
        "history": [{ "created_by": "fuzz", "empty_layer": true }],
    });
    add(
        seeds,
        "image_json",
        "config",
        serde_json::to_vec(&config).unwrap(),
    );
    for (name, text) in [
        ("ref-short", "busybox".to_owned()),
        ("ref-full", "registry.example.com:5000/a/b:tag".to_owned()),
        (
            "ref-digest",
            format!("docker.io/library/busybox@{AMD64_DIGEST}"),
        ),
    ] {
        add(seeds, "image_json", name, text.into_bytes());
    }
}

/// A tar stream of `entries`: (path, kind, data or link target).
fn tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        if kind.is_symlink() || kind.is_hard_link() {
            h.set_size(0);
            b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                .unwrap();
        } else {
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn layer() -> Vec<u8> {
    use tar::EntryType::*;
    let long = format!("d/{}", "n".repeat(150));
    tar(&[
        ("d/", Directory, b""),
        ("d/f", Regular, b"file data\n"),
        ("d/link", Symlink, b"f"),
        ("d/hard", Link, b"d/f"),
        ("d/abs", Symlink, b"/etc/passwd"),
        (long.as_str(), Regular, b"long name"),
        ("e/", Directory, b""),
        ("e/.wh..wh..opq", Regular, b""),
        ("d/.wh.gone", Regular, b""),
        ("fifo", Fifo, b""),
    ])
}

fn layer_unpack(seeds: &mut Seeds) {
    use tar::EntryType::*;
    let layer = layer();
    add(seeds, "layer_unpack", "tree", layer.clone());
    add(seeds, "layer_unpack", "tree-gzip", gzip(&layer));
    // Hostile: a link out, then a file through it; a path that climbs.
    add(
        seeds,
        "layer_unpack",
        "through-a-link",
        tar(&[("out", Symlink, b"../.."), ("out/x", Regular, b"escaped")]),
    );
    add(
        seeds,
        "layer_unpack",
        "hard-link-out",
        tar(&[("h", Link, b"../sentinel"), ("h", Regular, b"over")]),
    );
}

fn sha256(b: &[u8]) -> String {
    husk_image::store::sha256(b)
}

fn image_archive(seeds: &mut Seeds) {
    let layer = layer();
    let diff_id = sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["sh"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256(&config).trim_start_matches("sha256:"));
    let manifest = serde_json::to_vec(&serde_json::json!([
        { "Config": config_name, "RepoTags": ["fuzz:latest"], "Layers": ["layer/layer.tar"] },
    ]))
    .unwrap();
    let archive = tar(&[
        ("manifest.json", tar::EntryType::Regular, &manifest),
        (config_name.as_str(), tar::EntryType::Regular, &config),
        ("layer/", tar::EntryType::Directory, b""),
        ("layer/layer.tar", tar::EntryType::Regular, &layer),
    ]);
    add(seeds, "image_archive", "docker-save", archive);
}

fn agent_frames(seeds: &mut Seeds) {
    let requests = vec![
        Request::Create {
            id: "c".into(),
            spec: husk_runtime::bundle::default_spec(),
            process: Process {
                args: vec!["sh".into()],
                ..Default::default()
            },
            root: None,
            join: None,
        },
        Request::Clone(CloneSeed {
            entropy: vec![1, 2, 3],
            realtime_ns: 1,
        }),
        Request::Start { id: "c".into() },
        Request::Signal {
            id: "c".into(),
            exec_id: String::new(),
            signal: 15,
            all: true,
        },
        Request::Wait {
            id: "c".into(),
            exec_id: "e".into(),
        },
        Request::Update {
            id: "c".into(),
            resources: "{\"pids\":{\"limit\":5}}".into(),
        },
        Request::Shutdown,
    ];
    let mut all = Vec::new();
    for r in &requests {
        all.extend(frame(r).unwrap());
    }
    add(seeds, "agent_frames", "requests", all);
    let attach = StdioAttach {
        id: "c".into(),
        exec_id: String::new(),
        stream: Stream::Terminal,
    };
    add(seeds, "agent_frames", "attach", frame(&attach).unwrap());
    add(
        seeds,
        "agent_frames",
        "forward",
        frame(&Forward { port: 80 }).unwrap(),
    );
}

fn host_frames(seeds: &mut Seeds) {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        peer: "husk-agent".into(),
    };
    let mut b = frame(&hello).unwrap();
    for r in [
        Response::Ok,
        Response::Exited {
            status: 137,
            oom_kills: None,
        },
        Response::Stats(Stats {
            cpu_ns: 1,
            memory_bytes: 2,
            pids: 3,
            oom_kills: 0,
            memory_limit: Some(4),
        }),
        Response::Pids { pids: vec![1, 2] },
        Response::NotStarted {
            message: "no such program".into(),
            status: 127,
        },
        Response::Error {
            message: "failed".into(),
        },
        Response::OutputFollows,
    ] {
        b.extend(frame(&r).unwrap());
    }
    add(seeds, "host_frames", "responses", b);
    let mut b = Vec::new();
    for r in [
        Output::Stdout(b"out\n".to_vec()),
        Output::Stderr(b"err\n".to_vec()),
        Output::Exited(3),
    ] {
        write_output(&mut b, &r).unwrap();
    }
    add(seeds, "host_frames", "output", b);
}

fn dockerfile(seeds: &mut Seeds) {
    let two_stage = "# syntax=docker/dockerfile:1\nARG BASE=husk/busybox\nFROM $BASE AS base\n\
ARG GREETING=hello\nENV WHO=world A=\"two words\" B=${A:-d}\nWORKDIR /app\n\
COPY --chown=1:2 --chmod=640 greet.txt sub* ./\n\
RUN echo \"$GREETING $WHO\" > out.txt \\\n && cat greet.txt >> out.txt\n\
RUN <<EOT\necho here\nEOT\nFROM scratch\nCOPY --from=base /app/out.txt /out.txt\n\
LABEL built=by-husk \"a b\"=\"c d\"\nEXPOSE 8080 53/udp\nVOLUME [\"/data\"]\nUSER 1000:1000\n\
HEALTHCHECK --interval=5s CMD [\"true\"]\nONBUILD RUN echo later\nSTOPSIGNAL SIGTERM\n\
SHELL [\"/bin/sh\", \"-ec\"]\nENTRYPOINT [\"cat\"]\nCMD [\"/out.txt\"]\n";
    add(
        seeds,
        "dockerfile",
        "two-stage",
        two_stage.as_bytes().to_vec(),
    );
    add(
        seeds,
        "dockerfile",
        "ignore",
        b"# comment\n*.log\n/build\n!build/keep.txt\ndocs/**/*.md\n[ab].c\n".to_vec(),
    );
    add(
        seeds,
        "dockerfile",
        "escape",
        b"# escape=`\nFROM scratch\nRUN echo a `\n  b\nWORKDIR C:\\dir\n".to_vec(),
    );
}

fn all_seeds() -> Seeds {
    let mut seeds = Seeds::new();
    rng(&mut seeds);
    vsock(&mut seeds);
    net(&mut seeds);
    fs(&mut seeds);
    mmio(&mut seeds);
    snapshot(&mut seeds);
    checkpoint(&mut seeds);
    oci_config(&mut seeds);
    image_json(&mut seeds);
    layer_unpack(&mut seeds);
    image_archive(&mut seeds);
    agent_frames(&mut seeds);
    host_frames(&mut seeds);
    dockerfile(&mut seeds);
    seeds
}

fn run(target: &str, data: &[u8]) {
    match target {
        "virtio_rng" => targets::device(Kind::Rng, data),
        "virtio_vsock" => targets::device(Kind::Vsock, data),
        "virtio_net" => targets::device(Kind::Net, data),
        "virtio_fs" => targets::device(Kind::Fs, data),
        "mmio" => targets::mmio(data),
        "snapshot" => targets::snapshot(data),
        "checkpoint" => targets::checkpoint(data),
        "oci_config" => targets::oci_config(data),
        "image_json" => targets::image_json(data),
        "layer_unpack" => targets::layer_unpack(data),
        "image_archive" => targets::image_archive(data),
        "agent_frames" => targets::agent_frames(data),
        "host_frames" => targets::host_frames(data),
        "dockerfile" => targets::dockerfile(data),
        other => panic!("no target {other}"),
    }
}

/// Every seed, and every input kept in the corpus, runs through its
/// target without a crash. One test: the targets share scratch
/// directories.
#[test]
fn the_corpus_runs_clean() {
    let seeds = all_seeds();
    let write = std::env::var_os("HUSK_FUZZ_WRITE_SEEDS").is_some();
    for (target, list) in &seeds {
        let dir = corpus().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in list {
            if write {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            run(target, bytes);
        }
    }
    for (target, _) in &seeds {
        let mut kept: Vec<_> = std::fs::read_dir(corpus().join(target))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        kept.sort();
        for path in kept {
            let data = std::fs::read(&path).unwrap();
            eprintln!("{}", path.display());
            run(target, &data);
        }
    }
}
