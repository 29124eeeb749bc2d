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
    #[arg(long)]
    reference: String,
    #[arg(long)]
    version: String,
    /// The source revision, for the image's labels.
    #[arg(long, default_value = "unknown")]
    revision: String,
    /// Every timestamp in the image (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: u64,
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
    let layer = layer::build(&tree, args.source_date_epoch)?;
    let identity = archive::Identity {
        reference: args.reference.clone(),
        version: args.version.clone(),
        revision: args.revision.clone(),
        source_date_epoch: args.source_date_epoch,
    };
    let built = archive::write(&layer, &identity, &args.out)?;
    println!("{}", args.out.display());
    println!("reference  {}", args.reference);
    println!("digest     {}", built.digest);
    println!(
        "compressed {} bytes ({:.1} MiB)",
        built.compressed_bytes,
        built.compressed_bytes as f64 / 1048576.0
    );
    println!("archive    {} bytes", built.archive_bytes);
    Ok(())
}
