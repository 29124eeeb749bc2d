//! containerd's nvidia runtime: config editing, restart, revert.

pub mod config;
