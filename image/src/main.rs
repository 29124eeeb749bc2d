//! gpuprov-image: gpuprov's OCI image archive, built without a container
//! engine. scripts/image runs it on the release binary; see the README's
//! "The image".

mod archive;
mod layer;
mod rootfs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Builds gpuprov's OCI image archive from its binary, reproducibly")]
struct Args {
    /// The gpuprov binary to ship.
    #[arg(long)]
    binary: PathBuf,
    /// The OCI archive to write.
    #[arg(long, default_value = "target/image/gpuprov-oci.tar")]
    out: PathBuf,
    /// The image's full reference (containerd names it so on import).
    #[arg(long, required_unless_present = "rootfs")]
    reference: Option<String>,
    #[arg(long, required_unless_present = "rootfs")]
    version: Option<String>,
    /// The source revision, for the image's labels.
    #[arg(long, default_value = "unknown")]
    revision: String,
    /// Every timestamp in the image (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", required_unless_present = "rootfs")]
    source_date_epoch: Option<u64>,
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    ca_bundle: PathBuf,
    /// Write the image's files into this new directory instead of an
    /// archive (deploy/Containerfile copies them into a scratch image).
    #[arg(long)]
    rootfs: Option<PathBuf>,
}

fn main() -> ExitCode {
    match build(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gpuprov-image: {error}");
            ExitCode::FAILURE
        }
    }
}

fn build(args: &Args) -> Result<(), String> {
    let tree = rootfs::collect(&args.binary, &args.ca_bundle)?;
    if let Some(dir) = &args.rootfs {
        return rootfs::write_into(&tree, dir);
    }
    // clap requires these without --rootfs.
    let (Some(reference), Some(version), Some(source_date_epoch)) =
        (&args.reference, &args.version, args.source_date_epoch)
    else {
        return Err("--reference, --version and --source-date-epoch are needed".into());
    };
    let layer = layer::build(&tree, source_date_epoch)?;
    let identity = archive::Identity {
        reference: reference.clone(),
        version: version.clone(),
        revision: args.revision.clone(),
        source_date_epoch,
    };
    let built = archive::write(&layer, &identity, &args.out)?;
    println!("{}", args.out.display());
    println!("reference  {reference}");
    println!("digest     {}", built.digest);
    println!(
        "compressed {} bytes ({:.1} MiB)",
        built.compressed_bytes,
        built.compressed_bytes as f64 / 1048576.0
    );
    println!("archive    {} bytes", built.archive_bytes);
    Ok(())
}
