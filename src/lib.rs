//! gpuprov: converges a Kubernetes GPU node to a declared state.
//!
//! Data flow: `spec` (node.yaml) and `catalog` (states/*.yaml) compile into a
//! `plan::Graph` of states; `facts` are gathered once through `host`; the
//! `executor` walks the graph and, through the `registry`, each state's
//! capability (`gpu`, `driver`, `toolkit`, `containerd`, `operands`,
//! `exec`, …) observes and converges its part against the contract in
//! `state`; `labels` publishes the outcome. `converge` is the pipeline the
//! subcommands (`cmd`) and the daemon share.
//!
//! Vocabulary: a *state* is one unit of work (a file under `states/`, a
//! plan row, a label); a *capability* is the code that runs a kind of state
//! (a folder here, one registry entry), named by the state's `handler`
//! key.

pub mod background;
pub mod catalog;
pub mod cdi;
pub mod cli;
pub mod cmd;
pub mod containerd;
pub mod converge;
pub mod cri;
pub mod crio;
pub mod daemon;
pub mod diagnostic;
pub mod digest;
pub mod download;
pub mod dra;
pub mod driver;
pub mod error_chain;
pub mod exec;
pub mod executor;
pub mod fabric;
pub mod facts;
pub mod gpu;
pub mod host;
pub mod interrupt;
pub mod kube;
pub mod label_syntax;
pub mod labels;
pub mod make;
pub mod mig;
pub mod operands;
pub mod peermem;
pub mod persistence;
pub mod plan;
pub mod printable;
pub mod readiness;
pub mod registry;
pub mod remediation;
pub mod report;
pub mod runtime;
pub mod slots;
pub mod spec;
pub mod state;
pub mod telemetry;
pub mod toolkit;
pub mod upgrade;

/// The crate's error: one variant per module that can fail a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("invalid state graph\n{0}")]
    Graph(diagnostic::Diagnostics),
    #[error("cannot observe the host at {root}")]
    Facts {
        root: String,
        #[source]
        source: facts::FactsError,
    },
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Lock(#[from] executor::LockError),
    #[error("cannot publish labels")]
    Labels(#[from] labels::LabelError),
    #[error("invalid node labels {origin}: {problem}")]
    NodeLabels { origin: String, problem: String },
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
    #[error("gpuprov run needs an API server: give --kubeconfig, or run in a pod")]
    NeedsApiServer,
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("revert stopped: {0}")]
    Revert(String),
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
}

/// Exit codes, as the README documents them.
pub mod exit {
    /// Success; for `plan --detailed-exitcode`, nothing to change.
    pub const OK: i32 = 0;
    /// An error: invalid input, an unreadable host, a failed write.
    pub const ERROR: i32 = 1;
    /// `plan --detailed-exitcode`: changes are pending.
    pub const CHANGES_PENDING: i32 = 2;
    /// `apply` ran, but some step failed, is blocked or absent.
    pub const NOT_CONVERGED: i32 = 3;
    /// `apply` gave up waiting for another run's lock.
    pub const LOCKED: i32 = 4;
    /// `apply` stopped on SIGTERM or SIGINT after the action in progress.
    pub const INTERRUPTED: i32 = 5;
}

impl Error {
    /// Whether a run that ended in this error may succeed if tried again:
    /// the API server unreachable or answering 5xx, another run holding
    /// the lock. Invalid input and a host that cannot be read stay as
    /// they are.
    pub fn kind(&self) -> state::ErrorKind {
        match self {
            Error::Kube(_) | Error::Lock(_) | Error::Labels(_) => state::ErrorKind::Transient,
            _ => state::ErrorKind::NeedsOperator,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Lock(executor::LockError::Timeout { .. }) => exit::LOCKED,
            Error::Kube(kube::KubeError::Interrupted { .. })
            | Error::Labels(labels::LabelError::Kube(kube::KubeError::Interrupted { .. })) => {
                exit::INTERRUPTED
            }
            _ => exit::ERROR,
        }
    }
}
