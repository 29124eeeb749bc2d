//! The `peermem` capability (GPUDirect RDMA, `driver.rdma.enabled`):
//! load `nvidia-peermem`, which lets an RDMA NIC read and write GPU
//! memory directly, once the driver is loaded and where such a NIC is on
//! the bus. The module ships with the driver (built where the NIC's
//! `ib_core` was present); gpuprov loads it, as the GPU Operator's driver
//! container does, and reports it.

use crate::gpu::pci::PciFunction;
use crate::state::{Change, Observation, Outcome, StateContext, StateError};

pub const MODULE: &str = "nvidia-peermem";
/// Where the kernel shows the module once loaded.
pub const LOADED: &str = "/sys/module/nvidia_peermem";
/// Mellanox, now NVIDIA networking: ConnectX and BlueField.
const MELLANOX_VENDOR: u16 = 0x15b3;

/// ConnectX functions that move data: network controllers (Ethernet
/// 0x0200, InfiniBand 0x0207), not the switch ports and bridges a
/// ConnectX-7 board also puts on the bus.
pub fn rdma_nics(pci: &[PciFunction]) -> Vec<&PciFunction> {
    pci.iter()
        .filter(|f| f.vendor == MELLANOX_VENDOR && f.class_code() >> 8 == 0x02)
        .collect()
}

/// The `peermem` capability.
pub fn observe(ctx: &StateContext) -> Result<Observation, StateError> {
    let nics = rdma_nics(&ctx.facts.pci);
    if nics.is_empty() {
        return Ok(Observation::new(
            Outcome::Disabled,
            "no RDMA NIC (Mellanox/NVIDIA ConnectX) on the PCI bus: nothing for nvidia-peermem to serve",
        ));
    }
    let listed = nics
        .iter()
        .map(|n| format!("{} (15b3:{:04x})", n.address, n.device))
        .collect::<Vec<_>>()
        .join(", ");
    if ctx.host.exists(LOADED)? {
        return Ok(Observation::new(
            Outcome::Ready,
            format!("{MODULE} is loaded for {} RDMA NICs: {listed}", nics.len()),
        ));
    }
    let mut obs = Observation::new(
        Outcome::Absent,
        format!("{MODULE} is not loaded; RDMA NICs: {listed}"),
    );
    obs.on_change = Outcome::Ready;
    obs.changes.push(Change::Run {
        argv: vec!["modprobe".to_string(), MODULE.to_string()],
        display: format!("modprobe {MODULE}"),
    });
    Ok(obs)
}
