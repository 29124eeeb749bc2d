//! GPU detection on real machines: every `lspci` listing in
//! ../shared/realworld/pci becomes a sysfs tree (device directories,
//! bus symlinks, driver links), which gpuprov's real scan then reads.
//!
//! A file may hold several machines or views (host and guest, before and
//! after binding vfio-pci); a new section starts at each `##` heading or
//! shell prompt, and each section is one host.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpuprov::facts::Facts;
use gpuprov::gpu::pci::NvidiaFunction;
use gpuprov::host::{CommandMode, Host};

fn realworld() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/realworld/pci")
}

/// One function as a listing shows it.
#[derive(Debug, Clone)]
struct Listed {
    address: String,
    class: u32,
    vendor: u16,
    device: u16,
    driver: Option<String>,
}

/// lspci's class names, for listings printed without `-nn`.
fn class_from_name(name: &str) -> u32 {
    let code = match name {
        "3D controller" => 0x0302,
        "VGA compatible controller" => 0x0300,
        "Bridge" => 0x0680,
        "PCI bridge" => 0x0604,
        "Host bridge" => 0x0600,
        "Audio device" => 0x0403,
        "USB controller" | "USB Controller" => 0x0c03,
        "Ethernet controller" => 0x0200,
        "Infiniband controller" => 0x0207,
        "Memory controller" => 0x0580,
        "System peripheral" => 0x0880,
        "Serial Attached SCSI controller" => 0x0107,
        _ => 0xff00,
    };
    code << 8
}

fn vendor_from_name(text: &str) -> u16 {
    if text.starts_with("NVIDIA Corporation") || text.starts_with("nVidia Corporation") {
        0x10de
    } else if text.starts_with("PMC-Sierra") {
        0x11f8
    } else {
        0xffff
    }
}

/// `[10de:2330]` or, without `-nn`, `Device 2330`.
fn ids(text: &str, vendor_by_name: u16) -> (u16, u16) {
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('[') {
        let inner = &text[i + 1..];
        if let Some(end) = inner.find(']') {
            let pair = &inner[..end];
            if pair.len() == 9 && bytes.get(i + 5) == Some(&b':') {
                let v = u16::from_str_radix(&pair[..4], 16);
                let d = u16::from_str_radix(&pair[5..], 16);
                if let (Ok(v), Ok(d)) = (v, d) {
                    return (v, d);
                }
            }
        }
    }
    let device = text
        .split_whitespace()
        .skip_while(|w| *w != "Device")
        .nth(1)
        .and_then(|w| u16::from_str_radix(w, 16).ok())
        .unwrap_or(0);
    (vendor_by_name, device)
}

/// Parses `[DDDD:]BB:DD.F Class name [cccc]: Vendor … [vvvv:dddd]`.
fn parse_header(line: &str) -> Option<Listed> {
    let line = line.trim();
    let (address, rest) = line.split_once(' ')?;
    let parts: Vec<&str> = address.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, f] if d.len() == 4 => (*d, *b, *f),
        [b, f] => ("0000", *b, *f),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_hexdigit());
    if !(hex(domain, 4) && hex(bus, 2) && hex(dev, 2) && func.len() == 1) {
        return None;
    }
    let (class_part, device_part) = rest.split_once(": ")?;
    let class = match class_part.rfind(" [") {
        Some(i) if class_part.ends_with(']') => {
            u32::from_str_radix(&class_part[i + 2..class_part.len() - 1], 16).ok()? << 8
        }
        _ => class_from_name(class_part),
    };
    let (vendor, device) = ids(device_part, vendor_from_name(device_part));
    Some(Listed {
        address: format!("{domain}:{bus}:{dev}.{func}").to_lowercase(),
        class,
        vendor,
        device,
        driver: None,
    })
}

fn is_section_start(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("##")
        || t.starts_with("$ ")
        || t.contains("]# ")
        || t.contains("]$ ")
        || t.contains(":~# ")
        || t.contains("~(openstack)# ")
}

/// The file's sections, each the functions it lists (by address, in order).
fn sections(text: &str) -> Vec<BTreeMap<String, Listed>> {
    let mut out: Vec<BTreeMap<String, Listed>> = vec![BTreeMap::new()];
    let mut last: Option<String> = None;
    for line in text.lines() {
        if is_section_start(line) {
            if !out.last().unwrap().is_empty() {
                out.push(BTreeMap::new());
            }
            last = None;
            continue;
        }
        if let Some(listed) = parse_header(line) {
            last = Some(listed.address.clone());
            out.last_mut()
                .unwrap()
                .insert(listed.address.clone(), listed);
        } else if let Some(driver) = line.trim().strip_prefix("Kernel driver in use: ")
            && let Some(address) = &last
        {
            out.last_mut().unwrap().get_mut(address).unwrap().driver =
                Some(driver.trim().to_string());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Lays the functions out as sysfs does.
fn sysfs(root: &Path, functions: &BTreeMap<String, Listed>) {
    let devices = root.join("sys/bus/pci/devices");
    fs::create_dir_all(&devices).unwrap();
    for f in functions.values() {
        let dir = root
            .join("sys/devices")
            .join(format!("pci{}", &f.address[..7]))
            .join(&f.address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("0x{:04x}\n", f.vendor)).unwrap();
        fs::write(dir.join("device"), format!("0x{:04x}\n", f.device)).unwrap();
        fs::write(dir.join("class"), format!("0x{:06x}\n", f.class)).unwrap();
        if let Some(driver) = &f.driver {
            symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                dir.join("driver"),
            )
            .unwrap();
        }
        symlink(
            format!("../../../devices/pci{}/{}", &f.address[..7], f.address),
            devices.join(&f.address),
        )
        .unwrap();
    }
}

/// What gpuprov finds in one section: GPUs, with their drivers, and the
/// other NVIDIA functions by kind.
fn detect(functions: &BTreeMap<String, Listed>) -> String {
    let dir = tempfile::tempdir().unwrap();
    sysfs(dir.path(), functions);
    std::fs::create_dir_all(dir.path().join("proc")).unwrap();
    let host = Host::new(dir.path(), CommandMode::Prefix, Duration::from_secs(5)).unwrap();
    let facts = Facts::gather(&host, BTreeMap::new()).unwrap();
    let mut drivers: BTreeMap<String, usize> = BTreeMap::new();
    for gpu in facts.gpus() {
        *drivers
            .entry(gpu.driver.clone().unwrap_or_else(|| "?".into()))
            .or_default() += 1;
    }
    let mut others: BTreeMap<NvidiaFunction, usize> = BTreeMap::new();
    for kind in facts
        .pci
        .iter()
        .filter_map(|f| f.nvidia_kind())
        .filter(|k| *k != NvidiaFunction::Gpu)
    {
        *others.entry(kind).or_default() += 1;
    }
    let drivers: Vec<String> = drivers.iter().map(|(d, n)| format!("{d}×{n}")).collect();
    let others: Vec<String> = others.iter().map(|(k, n)| format!("{k:?}×{n}")).collect();
    format!(
        "{} GPU [{}] + [{}]",
        facts.gpus().count(),
        drivers.join(" "),
        others.join(" ")
    )
}

/// Per file, what each section must yield. Read off each file's own notes:
/// `?` is a driver the listing does not show.
const EXPECTED: &[(&str, &[&str])] = &[
    // 8 H100 on nvidia, 4 NVSwitches; the PMC-Sierra switch with an NVIDIA subsystem is not NVIDIA's.
    (
        "01-hgx-h100-dell-gpud-lspci-vvv-condensed.txt",
        &["8 GPU [nvidia×8] + [NvSwitch×4]"],
    ),
    // Host: 8 GPUs, 4 NVSwitches, ASPEED VGA ignored; the 8-GPU guest sees what it was given; an
    // earlier guest had 4 GPUs and a virtio VGA that is not NVIDIA's.
    (
        "02-hgx-h100-rhel-kvm-host-and-guest-lspci-Dnn.txt",
        &[
            "8 GPU [?×8] + [NvSwitch×4]",
            "8 GPU [?×8] + [NvSwitch×4]",
            "4 GPU [?×4] + []",
        ],
    ),
    // GPU listing, then -nn with NVSwitches, then after binding vfio-pci (NVSwitches stay
    // driverless). That last listing prints names only, no device ids, so the NVSwitches there
    // can only be told apart from nForce's class-0x0680 Ethernet by id: they count as "other".
    (
        "03-hgx-a100-openstack-host-vfio-pci.txt",
        &[
            "8 GPU [?×8] + []",
            "8 GPU [?×8] + [NvSwitch×6]",
            "8 GPU [vfio-pci×8] + [Other×6]",
        ],
    ),
    // Hyper-V domains; 6 NVSwitches listed without a name.
    (
        "04-azure-nd-a100-v4-vm-lspci-nn.txt",
        &["8 GPU [?×8] + [NvSwitch×6]"],
    ),
    // One A10; the virtio VGA is not NVIDIA's.
    ("05-cloud-vm-single-a10-lspci-nn.txt", &["1 GPU [?×1] + []"]),
    (
        "06-aws-vm-4x-l4-lspci-and-nvidia-smi.txt",
        &["4 GPU [?×4] + []"],
    ),
    // One RTX 2080 Ti with audio, xHCI and UCSI functions; the ASPEED VGA is not NVIDIA's.
    (
        "07-workstation-ryzen-aspeed-rtx2080ti-4-functions-lspci-nn.txt",
        &["1 GPU [?×1] + [Audio×1 Usb×2]"],
    ),
    // Laptop (nvidia), RTX 3080 (nvidia), GTX 970 (nouveau), each with its audio where listed.
    (
        "08-consumer-geforce-driver-binding-nvidia-vs-nouveau.txt",
        &[
            "1 GPU [nvidia×1] + [Audio×1]",
            "1 GPU [nvidia×1] + [Audio×1]",
            "1 GPU [nouveau×1] + []",
        ],
    ),
    // 8 RTX 6000 Ada (VGA class) with 8 audio functions; after vfio-pci the author's
    // `grep -A 3` kept only the first GPU and its audio.
    (
        "09-gigabyte-g493-8x-rtx6000ada-vfio-proxmox.txt",
        &["8 GPU [?×8] + [Audio×8]", "1 GPU [vfio-pci×1] + [Audio×1]"],
    ),
    // GT 720 + RTX 2080 Ti: 2 GPUs, 2 audio, 2 USB-class functions.
    (
        "10-mixed-model-gt720-kepler-plus-rtx2080ti-iommu-groups.txt",
        &["2 GPU [?×2] + [Audio×2 Usb×2]"],
    ),
    // GH200 in domain 0009 (two sources).
    (
        "11-gh200-grace-hopper-lspci.txt",
        &["1 GPU [?×1] + []", "1 GPU [?×1] + []"],
    ),
    // 13 Grace root ports, no GPU.
    (
        "12-grace-cpu-root-ports-no-gpu-miyabi.txt",
        &["0 GPU [] + [PciBridge×13]"],
    ),
    // nForce: 26 NVIDIA functions, one GPU; MCP55 Ethernet is class 0x0680 but no NVSwitch.
    (
        "13-nforce-mcp55-chipset-plus-geforce7900-negative.txt",
        &["1 GPU [?×1] + [Usb×2 PciBridge×5 Other×18]"],
    ),
    // GCE: one T4; AWS metal: 8 T4 on nvidia.
    (
        "14-cloud-t4-gcp-single-and-aws-g4dn-metal.txt",
        &["1 GPU [?×1] + []", "8 GPU [nvidia×8] + []"],
    ),
];

#[test]
#[cfg_attr(
    not(gpuprov_realworld),
    ignore = "needs the real-world corpus beside the repository (CI has it)"
)]
fn every_real_listing_yields_the_gpus_it_holds() {
    let mut files: Vec<String> = fs::read_dir(realworld())
        .expect("../shared/realworld/pci is beside the repository")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    files.sort();
    let listed: Vec<&str> = EXPECTED.iter().map(|e| e.0).collect();
    assert_eq!(files, listed, "a listing without an expectation");

    let mut failures = Vec::new();
    for (file, expected) in EXPECTED {
        let text = fs::read_to_string(realworld().join(file)).unwrap();
        let found: Vec<String> = sections(&text).iter().map(detect).collect();
        if found != *expected {
            failures.push(format!(
                "{file}:\n  expected {expected:?}\n  found    {found:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
