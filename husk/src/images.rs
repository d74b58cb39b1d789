//! docker's image commands: pull, push, tag, images, rmi, load, save,
//! import (docs/images.md).

use std::path::Path;
use std::path::PathBuf;

use anyhow::Context;
use husk_image::reference::Reference;
use husk_image::registry::Client;
use husk_image::store::Store;

// The arguments of `pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// The image (`busybox`, `127.0.0.1:5000/app:v1`).
    pub image: String,
}

/// Runs `husk pull`.
pub fn pull(root: &Path, args: PullArgs) -> anyhow::Result<u8> {
    let PullArgs { image } = args;
    let store = Store::open(root)?;
    let reference = Reference::parse(&image)?;
    let pulled = Client::new(&reference.registry).pull(&store, &reference)?;
    println!("{}", pulled.manifest);
    Ok(0)
}

// The arguments of `push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// The image, named for the registry (`husk tag` names it).
    pub image: String,
}

/// Runs `husk push`.
pub fn push(root: &Path, args: PushArgs) -> anyhow::Result<u8> {
    let PushArgs { image } = args;
    let store = Store::open(root)?;
    let found = store.find(&image)?;
    let reference = Reference::parse(&image)?;
    let digest = Client::new(&reference.registry).push(&store, &found, &reference)?;
    println!("{digest}");
    Ok(0)
}

// The arguments of `tag`.
#[derive(clap::Args)]
pub struct TagArgs {
    /// The image.
    pub source: String,
    /// The new name.
    pub target: String,
}

/// Runs `husk tag`.
pub fn tag(root: &Path, args: TagArgs) -> anyhow::Result<u8> {
    let TagArgs { source, target } = args;
    let store = Store::open(root)?;
    let mut image = store.find(&source)?;
    image.name = Reference::parse(&target)?.to_string();
    store.add_image(image)?;
    Ok(0)
}

// The arguments of `images`.
#[derive(clap::Args)]
pub struct ImagesArgs {
    /// IDs only.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs `husk images`.
pub fn images(root: &Path, args: ImagesArgs) -> anyhow::Result<u8> {
    let ImagesArgs { quiet } = args;
    let store = Store::open(root)?;
    let images = store.images()?;
    if !quiet {
        println!(
            "{:<40} {:<12} {:<14} {:<22} SIZE",
            "REPOSITORY", "TAG", "IMAGE ID", "STORED"
        );
    }
    for image in images {
        if quiet {
            println!("{}", image.short_id());
            continue;
        }
        let r = Reference::parse(&image.name)?;
        println!(
            "{:<40} {:<12} {:<14} {:<22} {}",
            r.short_name(),
            r.tag.as_deref().unwrap_or("<none>"),
            image.short_id(),
            image.stored,
            human_size(image.size())
        );
    }
    Ok(0)
}

// The arguments of `rmi`.
#[derive(clap::Args)]
pub struct RmiArgs {
    /// Even when a container uses it.
    #[arg(long, short)]
    pub force: bool,
    /// Images.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// Runs `husk rmi`.
pub fn rmi(root: &Path, args: RmiArgs) -> anyhow::Result<u8> {
    let RmiArgs { force, images } = args;
    let store = Store::open(root)?;
    let containers = husk_docker::Record::all(root);
    for what in &images {
        let image = store.find(what)?;
        if let Some(c) = containers.iter().find(|c| c.image_id == image.config) {
            if !force {
                anyhow::bail!(
                    "image {what} is used by container {} (remove it first, or rmi -f)",
                    c.name
                );
            }
        }
        store.remove_name(&image.name)?;
        println!("Untagged: {}", image.name);
    }
    let collected = store.collect_garbage(&husk_docker::layers_in_use(root))?;
    println!(
        "Deleted: {} blobs, {} layers",
        collected.blobs, collected.layers
    );
    Ok(0)
}

// The arguments of `load`.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// The archive (tar or OCI layout directory; default stdin).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
}

/// Runs `husk load`.
pub fn load(root: &Path, args: LoadArgs) -> anyhow::Result<u8> {
    let LoadArgs { input } = args;
    let store = Store::open(root)?;
    let path = input.unwrap_or_else(|| PathBuf::from("-"));
    for image in husk_image::archive::load(&store, &path)? {
        println!("Loaded image: {}", image.name);
    }
    Ok(0)
}

// The arguments of `save`.
#[derive(clap::Args)]
pub struct SaveArgs {
    /// The archive (default stdout).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Images.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// Runs `husk save`.
pub fn save(root: &Path, args: SaveArgs) -> anyhow::Result<u8> {
    let SaveArgs { output, images } = args;
    let store = Store::open(root)?;
    let found = images
        .iter()
        .map(|i| store.find(i))
        .collect::<Result<Vec<_>, _>>()?;
    match output {
        Some(path) => {
            let tmp = path.with_extension("tmp");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let saved = husk_image::archive::save(&store, &found, std::io::BufWriter::new(file));
            if let Err(e) = saved {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        None => husk_image::archive::save(&store, &found, std::io::stdout().lock())?,
    }
    Ok(0)
}

// The arguments of `import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// The tarball (plain, gzip or zstd).
    pub file: PathBuf,
    /// The image's name.
    pub reference: String,
}

/// Runs `husk import`.
pub fn import(root: &Path, args: ImportArgs) -> anyhow::Result<u8> {
    let ImportArgs { file, reference } = args;
    let store = Store::open(root)?;
    let image = husk_image::archive::import(&store, &file, &Reference::parse(&reference)?)?;
    println!("{}", image.config);
    Ok(0)
}

pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GB", b as f64 / f64::from(1u32 << 30)),
        b if b >= 1 << 20 => format!("{:.1}MB", b as f64 / f64::from(1u32 << 20)),
        b => format!("{:.1}kB", b as f64 / 1024.0),
    }
}

// The arguments of `build`.
#[derive(clap::Args)]
pub struct BuildArgs {
    /// Name (and tag) for the image; may be given more than once.
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<std::path::PathBuf>,
    /// A build argument, KEY=VALUE (KEY alone takes it from the
    /// environment).
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// The stage to build (by name or number).
    #[arg(long)]
    pub target: Option<String>,
    /// Build every step again.
    #[arg(long)]
    pub no_cache: bool,
    /// A label for the image, KEY=VALUE.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// linux/amd64, the only platform husk builds.
    #[arg(long)]
    pub platform: Option<String>,
    /// Also write the image to an archive: `type=oci,dest=FILE` (an OCI
    /// image layout in a tar, as `husk save` writes; `husk load`, `docker
    /// load` and `podman load` read it).
    #[arg(long, short = 'o')]
    pub output: Option<String>,
    /// The build context: a directory.
    pub context: std::path::PathBuf,
}

/// `--output`'s destination: `type=oci,dest=FILE` (or `type=docker`, the
/// same archive). Anything else is refused, naming it.
fn output_dest(spec: &str) -> anyhow::Result<PathBuf> {
    let mut kind = None;
    let mut dest = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("type", t)) => kind = Some(t),
            Some(("dest", d)) if !d.is_empty() => dest = Some(PathBuf::from(d)),
            _ => anyhow::bail!("--output {spec}: {part:?} is not type=... or dest=..."),
        }
    }
    match (kind, dest) {
        (Some("oci" | "docker"), Some(d)) => Ok(d),
        (Some(t), _) if t != "oci" && t != "docker" => {
            anyhow::bail!(
                "--output {spec}: type {t} is not supported (oci or docker, with dest=FILE)"
            )
        }
        _ => anyhow::bail!("--output {spec}: it needs type=oci and dest=FILE"),
    }
}

/// Runs `husk build`.
pub fn build(root: &Path, args: BuildArgs) -> anyhow::Result<u8> {
    if let Some(p) = args.platform.as_deref().filter(|p| *p != "linux/amd64") {
        anyhow::bail!("--platform {p}: husk builds linux/amd64 only");
    }
    let mut build_args = std::collections::HashMap::new();
    for kv in &args.build_args {
        match kv.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            None => match std::env::var(kv) {
                Ok(v) => build_args.insert(kv.clone(), v),
                Err(_) => continue,
            },
        };
    }
    let labels = args
        .labels
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--label {kv}: not KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Some(
            v.parse::<u64>()
                .map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH={v}: not a number of seconds"))?,
        ),
        Err(_) => None,
    };
    let output = args.output.as_deref().map(output_dest).transpose()?;
    let context = std::fs::canonicalize(&args.context)
        .map_err(|e| anyhow::anyhow!("the build context {}: {e}", args.context.display()))?;
    let options = husk_build::exec::Options {
        root,
        context: &context,
        dockerfile: args.file.as_deref(),
        tags: &args.tags,
        build_args: &build_args,
        target: args.target.as_deref(),
        no_cache: args.no_cache,
        labels: &labels,
        epoch,
    };
    let mut out = std::io::stdout();
    let id = husk_build::exec::build(&options, &mut out)?;
    if let Some(path) = output {
        let store = Store::open(root)?;
        let image = store.find(&id)?;
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let saved = husk_image::archive::save(&store, &[image], std::io::BufWriter::new(file));
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        println!("writing {}", path.display());
    }
    Ok(0)
}
