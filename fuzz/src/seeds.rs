//! Seed inputs, written in the programs' own formats (the tables in
//! [`crate::virtq`] and each target's documentation), so that a fuzz run
//! starts from requests a real guest or image would send and mutates from
//! there. `tests/seeds.rs` writes them under `corpus/<target>/seed-*`.

use crate::virtq::{op, queue_setup};

/// A guest program being written.
#[derive(Default, Clone)]
pub struct Program {
    bytes: Vec<u8>,
}

/// One descriptor of a chain.
pub enum Desc {
    /// Bytes the device reads.
    Read(Vec<u8>),
    /// A buffer of this many bytes the device writes.
    Write(u32),
}

impl Program {
    /// A program that starts with `header` (a target's leading bytes).
    pub fn new(header: &[u8]) -> Self {
        Self {
            bytes: header.to_vec(),
        }
    }

    /// A chain of `descs` made available on queue `queue`.
    pub fn chain(&mut self, queue: u8, descs: &[Desc]) -> &mut Self {
        assert!((1..=8).contains(&descs.len()));
        self.bytes
            .extend([op::CHAIN, queue, (descs.len() - 1) as u8]);
        for d in descs {
            match d {
                Desc::Read(b) => {
                    self.bytes.push(0);
                    self.bytes.extend((b.len() as u16).to_le_bytes());
                    self.bytes.extend(b);
                }
                Desc::Write(len) => {
                    self.bytes.push(1);
                    self.bytes.extend(len.to_le_bytes());
                }
            }
        }
        self
    }

    /// The guest notifies queue `queue`.
    pub fn notify(&mut self, queue: u8) -> &mut Self {
        self.bytes.extend([op::NOTIFY, queue]);
        self
    }

    /// A 32-bit register write.
    pub fn write_reg(&mut self, offset: u64, value: u32) -> &mut Self {
        self.bytes.push(op::REG_WRITE);
        self.bytes.extend((offset as u16).to_le_bytes());
        self.bytes.extend(u64::from(value).to_le_bytes());
        self
    }

    /// A 32-bit register read.
    pub fn read_reg(&mut self, offset: u64) -> &mut Self {
        self.bytes.push(op::REG_READ);
        self.bytes.extend((offset as u16).to_le_bytes());
        self
    }

    /// A host operation: its operand bytes as the device's harness reads
    /// them.
    pub fn host(&mut self, operands: &[u8]) -> &mut Self {
        self.bytes.push(op::HOST);
        self.bytes.extend(operands);
        self
    }

    /// The host side's turn.
    pub fn tick(&mut self) -> &mut Self {
        self.bytes.push(op::TICK);
        self
    }

    /// Linux's driver start, written as register operations: features
    /// `features` accepted, queues of `sizes` at the harness's places.
    pub fn bring_up(&mut self, features: u64, sizes: &[u16]) -> &mut Self {
        use husk_vmm::devices::virtio::mmio::*;
        self.write_reg(REG_STATUS, 1 | 2)
            .write_reg(REG_DEVICE_FEATURES_SEL, 1)
            .read_reg(REG_DEVICE_FEATURES)
            .write_reg(REG_DRIVER_FEATURES_SEL, 0)
            .write_reg(REG_DRIVER_FEATURES, features as u32)
            .write_reg(REG_DRIVER_FEATURES_SEL, 1)
            .write_reg(REG_DRIVER_FEATURES, (features >> 32) as u32)
            .write_reg(REG_STATUS, 1 | 2 | 8);
        for (i, &size) in sizes.iter().enumerate() {
            for (offset, value) in queue_setup(i, size) {
                self.write_reg(offset, value);
            }
        }
        self.write_reg(REG_STATUS, 1 | 2 | 8 | 4)
    }

    /// The program's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

/// A FUSE request: `fuse_in_header` (length, opcode, unique, node ID,
/// uid, gid, pid, padding) and its arguments.
pub fn fuse(opcode: u32, unique: u64, node: u64, args: &[u8]) -> Vec<u8> {
    let len = 40 + args.len() as u32;
    let mut b = Vec::with_capacity(len as usize);
    b.extend(len.to_le_bytes());
    b.extend(opcode.to_le_bytes());
    b.extend(unique.to_le_bytes());
    b.extend(node.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // uid
    b.extend(0u32.to_le_bytes()); // gid
    b.extend(1u32.to_le_bytes()); // pid
    b.extend(0u16.to_le_bytes()); // total_extlen
    b.extend(0u16.to_le_bytes()); // padding
    b.extend(args);
    b
}

/// A vsock packet header (44 bytes) followed by `payload`.
#[allow(clippy::too_many_arguments)]
pub fn vsock_packet(
    src_port: u32,
    dst_port: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(44 + payload.len());
    b.extend(3u64.to_le_bytes()); // src_cid: the guest
    b.extend(2u64.to_le_bytes()); // dst_cid: the host
    b.extend(src_port.to_le_bytes());
    b.extend(dst_port.to_le_bytes());
    b.extend((payload.len() as u32).to_le_bytes());
    b.extend(1u16.to_le_bytes()); // type: stream
    b.extend(op.to_le_bytes());
    b.extend(flags.to_le_bytes());
    b.extend(buf_alloc.to_le_bytes());
    b.extend(fwd_cnt.to_le_bytes());
    b.extend(payload);
    b
}
