//! The 8250 UART at COM1 (vm-superio), the guest's console.
//!
//! Output goes to a writer the VMM chooses (its stdout or a file); the
//! interrupt is an eventfd the VM wires to IRQ 4. Guest input is not read
//! yet: the console is for the kernel's log and early user space.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use serde::{Deserialize, Serialize};

/// The UART's registers (vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Raises the UART's interrupt by writing its eventfd (an irqfd in KVM).
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps the eventfd registered as the UART's irqfd.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port-I/O bus.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that writes what the guest sends to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    /// A UART restored to `regs` (from a snapshot); None when the registers
    /// are impossible (more input than the FIFO holds).
    pub fn from_regs(irq: EventFd, out: Box<dyn Write + Send>, regs: &SerialRegs) -> Option<Self> {
        let state = SerialState {
            baud_divisor_low: regs.baud_divisor_low,
            baud_divisor_high: regs.baud_divisor_high,
            interrupt_enable: regs.interrupt_enable,
            interrupt_identification: regs.interrupt_identification,
            line_control: regs.line_control,
            line_status: regs.line_status,
            modem_control: regs.modem_control,
            modem_status: regs.modem_status,
            scratch: regs.scratch,
            in_buffer: regs.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, EventFdTrigger::new(irq), NoEvents, out).ok()?;
        Some(Self { uart })
    }

    /// The UART's registers, for a snapshot.
    pub fn regs(&self) -> SerialRegs {
        let s = self.uart.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Flushes what the guest wrote so far.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            // A console that cannot be written (a closed pipe) must not stop
            // the guest: its output is lost, the VM goes on.
            let _ = self.uart.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_writer_and_raise_the_irq() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut console = SerialConsole::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        // Enable the "transmitter holding register empty" interrupt (IER bit 1).
        console.write(1, &[0x02]);
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        // Line status: transmitter empty, as the guest's driver polls for.
        let mut lsr = [0u8];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x60, 0);

        // Its registers survive a snapshot.
        console.write(7, &[0x5a]);
        let regs = console.regs();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = SerialConsole::from_regs(irq2, Box::new(out.clone()), &regs).unwrap();
        assert_eq!(restored.regs(), regs);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
    }
}
