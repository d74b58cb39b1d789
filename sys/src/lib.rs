//! The system calls husk's host side makes that no well-kept crate
//! covers, kept in one named place so the `unsafe` they need is easy to
//! find and review (docs/design.md, "unsafe").
#![deny(missing_docs)]

pub mod child;
