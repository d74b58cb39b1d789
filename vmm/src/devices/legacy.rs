//! Legacy PC ports the guest uses to say it is done: the Husk debug port
//! (boot-phase marks, power-off, panic) and the i8042 controller's reset
//! line (`reboot=k`).
//!
//! Neither device knows what the VMM does about an exit: each hands a
//! [`GuestEvent`] to the sink the VM gave it.

use std::sync::Arc;

use super::BusDevice;
use crate::timing::Clock;

pub use husk_protocol::marks::{
    DEBUG_PORT, EXIT_PANIC, EXIT_POWER_OFF, MARK_INIT_START, MARK_KERNEL_START,
};

/// i8042 data and command/status ports.
pub const I8042_DATA_PORT: u64 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;

/// What the guest said about its own end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest powered off.
    PowerOff,
    /// The guest reset the machine (a reboot, or the end of a panic).
    Reset,
    /// The guest kernel panicked; a reset usually follows.
    Panic,
    /// Any other debug-port value: a boot mark.
    Mark(u8),
}

/// Where a device reports a [`GuestEvent`].
pub type EventSink = Box<dyn Fn(GuestEvent) + Send>;

/// Records boot marks and turns power-off and panic codes into events.
pub struct DebugPort {
    clock: Arc<Clock>,
    events: EventSink,
}

impl DebugPort {
    /// A debug port that timestamps on `clock` and reports on `events`.
    pub fn new(clock: Arc<Clock>, events: EventSink) -> Self {
        Self { clock, events }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.clock.mark(value);
        let event = match value {
            EXIT_POWER_OFF => GuestEvent::PowerOff,
            EXIT_PANIC => GuestEvent::Panic,
            mark => GuestEvent::Mark(mark),
        };
        (self.events)(event);
    }
}

/// Just enough of an i8042 for Linux's keyboard-controller reboot: the
/// status register reads "input buffer empty", and command 0xFE resets.
pub struct I8042Reset {
    events: EventSink,
}

impl I8042Reset {
    /// A controller that reports resets on `events`.
    pub fn new(events: EventSink) -> Self {
        Self { events }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT && data.first() == Some(&I8042_RESET_CMD)
        {
            (self.events)(GuestEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn debug_port_marks_and_exits() {
        let clock = Arc::new(Clock::from_env());
        let (tx, rx) = channel();
        let mut port = DebugPort::new(clock.clone(), Box::new(move |e| tx.send(e).unwrap()));
        port.write(0, &[MARK_KERNEL_START]);
        port.write(0, &[MARK_INIT_START]);
        assert_eq!(rx.try_recv(), Ok(GuestEvent::Mark(MARK_KERNEL_START)));
        assert_eq!(rx.try_recv(), Ok(GuestEvent::Mark(MARK_INIT_START)));
        port.write(0, &[EXIT_PANIC]);
        port.write(0, &[EXIT_POWER_OFF]);
        assert_eq!(rx.try_recv(), Ok(GuestEvent::Panic));
        assert_eq!(rx.try_recv(), Ok(GuestEvent::PowerOff));
        let t = clock.snapshot();
        assert!(t.kernel_start_us.is_some() && t.init_start_us.is_some());
        assert_eq!(t.marks.len(), 4);
    }

    #[test]
    fn i8042_resets_only_on_command_fe() {
        let (tx, rx) = channel();
        let mut kbd = I8042Reset::new(Box::new(move |e| tx.send(e).unwrap()));
        let mut status = [0xffu8];
        kbd.read(4, &mut status);
        assert_eq!(status, [0], "input buffer must read empty");
        kbd.write(0, &[I8042_RESET_CMD]);
        kbd.write(4, &[0xd1]);
        assert!(rx.try_recv().is_err());
        kbd.write(4, &[I8042_RESET_CMD]);
        assert_eq!(rx.try_recv(), Ok(GuestEvent::Reset));
    }
}
