//! Commands and flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::host::CommandMode;
use crate::labels::LabelTarget;

#[derive(Debug, Parser)]
#[command(
    name = "gpuprov",
    version,
    about = "Converge a Kubernetes GPU node to a declared state"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (RUST_LOG syntax); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Observe the node and show every step with what it would change. Writes nothing.
    Plan(PlanArgs),
    /// Converge the node once (or, with --wait, until converged).
    Apply(ApplyArgs),
    /// List the catalogue of states in order.
    States(StatesArgs),
    /// Print everything observed on the node: PCI, driver, NVML, labels.
    Facts(FactsArgs),
    /// Remove what gpuprov added: containerd's runtime, the labels.
    Revert(ChangeArgs),
    /// Keep the node converged (DaemonSet mode): watch the Node, the config
    /// file and drift; serve /healthz, /readyz and /metrics.
    Run(RunArgs),
}

/// Flags shared by `plan` and `apply`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The desired-state YAML; the embedded default spec when absent.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// The node's root directory: `/` on the node, `/host` in a pod.
    #[arg(long, default_value = "/")]
    pub host_root: PathBuf,
    /// How commands reach the host [default: chroot, or plain when the root is /].
    #[arg(long, value_enum)]
    pub host_exec: Option<CommandMode>,
    /// A directory of state YAML files that add to or override the built-in ones.
    #[arg(long)]
    pub states_dir: Option<PathBuf>,
    /// The node's current labels, `key=value,key=value`.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// A file of the node's current labels, one `key=value` per line.
    #[arg(long)]
    pub node_labels_file: Option<PathBuf>,
    /// Where labels go: the Node by server-side apply, NFD's feature file
    /// under the host root, stdout, or nowhere. `auto`: the API server when
    /// one is configured, else the file.
    #[arg(long, value_enum, default_value_t = LabelTarget::Auto)]
    pub labels_sink: LabelTarget,
    /// The kubeconfig to reach the API server [default: in-cluster, else KUBECONFIG, else ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name [default: NODE_NAME, else the hostname].
    #[arg(long)]
    pub node_name: Option<String>,
    /// The NVML library [default: the host root's libnvidia-ml.so.1].
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
    /// Longest time one host command may run (`30s`, `5m`).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub command_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(long, short = 'o', value_enum, default_value_t = PlanFormat::Text)]
    pub output: PlanFormat,
    /// Exit 0 when there is nothing to do, 2 when changes are pending, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
    Dot,
}

/// `apply` and `revert`: they change the node, under the host's lock.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(long, short = 'o', value_enum, default_value_t = ReportFormat::Text)]
    pub output: ReportFormat,
    /// How long to wait for another run's lock on this host (`30s`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub lock_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Where to serve /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9402")]
    pub listen: std::net::SocketAddr,
    /// How often to check for drift on a converged node (`5m`).
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub drift_interval: Duration,
    /// How often to check again while a step waits on something outside
    /// gpuprov (an operand's pod starting): `pending`, not a failure, so no
    /// backoff.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub pending_interval: Duration,
    /// How often a node whose driver waits for a rolling upgrade's slot
    /// looks for a free one (one list of the slot Leases each time),
    /// with up to a fifth more at random so that a fleet spreads out.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub slot_wait_interval: Duration,
    /// How long the API server keeps each of gpuprov's watches (its Node,
    /// the operand pods on it) open before gpuprov opens it again, from
    /// where it left off: one request per watch per period on a
    /// converged node.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub watch_timeout: Duration,
    /// How long to wait for another run's lock on this host (`30s`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub lock_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub change: ChangeArgs,
    /// Retry until the node converges or --timeout passes (init-container mode).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to keep trying (`10m`).
    #[arg(long, value_parser = parse_duration, default_value = "10m", requires = "wait")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct FactsArgs {
    /// The node's root directory: `/` on the node, `/host` in a pod.
    #[arg(long, default_value = "/")]
    pub host_root: PathBuf,
    /// The NVML library [default: the host root's libnvidia-ml.so.1].
    #[arg(long)]
    pub nvml_lib: Option<PathBuf>,
    /// The node's current labels, `key=value,key=value`.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    #[arg(long, short = 'o', value_enum, default_value_t = ReportFormat::Text)]
    pub output: ReportFormat,
}

#[derive(Debug, Args)]
pub struct StatesArgs {
    /// A directory of state YAML files that add to or override the built-in ones.
    #[arg(long)]
    pub states_dir: Option<PathBuf>,
    /// Also list the user states of this spec.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value_t = ReportFormat::Text)]
    pub output: ReportFormat,
}

/// A duration flag (`90s`, `5m`, `1h30m`): at most a year, so that no
/// deadline computed from it overflows.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration > Duration::from_secs(crate::spec::MAX_SECONDS) {
        return Err("longer than a year, the longest wait gpuprov takes".to_string());
    }
    Ok(duration)
}
