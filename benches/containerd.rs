//! Benchmarks of the containerd config editor: a large real config, and the
//! no-op check on a config that already has the runtime.
//!
//! Run with `cargo bench --bench containerd`.

use std::path::PathBuf;
mod common;

use common::{measure, runs};

use gpuprov::containerd::config::{DefaultRuntime, RuntimeWanted, configure};

fn main() {
    let runs = runs(2000);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Debian 12's full `containerd config default` dump, the most common file
    // on kubeadm nodes (the largest of the real configs).
    let path = repo
        .join("../shared/realworld/containerd/12-debian12-containerd-1.6-default-systemd-v2.toml");
    let text = std::fs::read_to_string(&path).expect("the real configs are beside the repository");
    let wanted = RuntimeWanted {
        class: "nvidia".into(),
        binary: "/usr/bin/nvidia-container-runtime".into(),
        default: DefaultRuntime::Keep,
        cdi: None,
    };
    let edited = configure(&text, &wanted, 2).unwrap().text;
    let lines = text.lines().count();
    let (add, _) = measure(runs, || {
        std::hint::black_box(configure(&text, &wanted, 2).unwrap());
    });
    let (noop, _) = measure(runs, || {
        let again = configure(&edited, &wanted, 2).unwrap();
        assert_eq!(again.text, edited);
    });
    println!(
        "add the runtime to a {lines}-line real config      {runs:>6} runs  median {add:>10.2?}"
    );
    println!("check a config that already has it (no change) {runs:>6} runs  median {noop:>10.2?}");
}
