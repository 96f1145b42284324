//! Will this file run on that server? Binary inspection and the verdict.
//!
//! Contract of this crate:
//! - [`inspect`] takes any bytes and returns a [`Report`]; it never panics and
//!   never executes anything, whatever the input (a fuzz-style test in the
//!   end-to-end suite feeds it truncated and mutated real binaries), and its
//!   time and memory follow from the file's size, not from what the file's
//!   tables claim (a file claiming more than any program needs is refused:
//!   [`Report::oversized`]);
//! - [`judge`] compares a report with a [`ServerTarget`](nx_protocol::target::ServerTarget)
//!   and names every problem with its remedy, in the terms of the toolchain that
//!   built the file; the CLI and the receiver call the same function, so a
//!   binary refused by one is refused by the other with the same words;
//! - [`target::detect`] reads what a host offers from a root directory.

mod auditable;
mod elf;
mod gobuild;
#[cfg(test)]
mod hostile;
mod inspect;
pub mod report;
pub mod target;
pub mod verdict;

pub use inspect::inspect;
pub use report::Report;
pub use verdict::{judge, Problem, Verdict};
