//! `legora plugins`: load every plugin library found in the search folders
//! (`--plugin-dir`, then LEGORA_PLUGIN_PATH, then the binary's folder) — or the plugins
//! named on the command line — and list what each one registers.

use std::path::PathBuf;

use anyhow::bail;
use legora_plugin_host::{PluginHandle, PluginHost, PluginSource, PLUGIN_PATH_ENV};
use serde_json::json;

/// Arguments of `legora plugins`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Load only these plugins, by name (`medical`, `finance`, ...); an unknown name is
    /// an error. Default: every plugin library found.
    pub names: Vec<String>,
    /// Extra plugin folders, searched first (each must exist).
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Search only the --plugin-dir folders (not LEGORA_PLUGIN_PATH, not the binary's
    /// folder).
    #[arg(long)]
    pub no_default_dirs: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn source(p: &PluginHandle) -> String {
    match p.source() {
        PluginSource::Dynamic(path) => path.display().to_string(),
        PluginSource::Static => "(static)".into(),
    }
}

/// Run `legora plugins`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let mut host = PluginHost::new();
    for d in &args.plugin_dirs {
        if !d.is_dir() {
            bail!("--plugin-dir {}: no such folder", d.display());
        }
        host.add_search_dir(d);
    }
    if args.no_default_dirs {
        host.use_env_path(false).use_exe_dir(false);
    }
    let dirs = host.search_dirs();
    let mut skipped = Vec::new();
    if args.names.is_empty() {
        let found = host.discover();
        for path in found {
            // The same plugin in two folders: the first one found wins, as in `load_name`.
            if let Err(e) = host.load_path(&path) {
                skipped.push((path, e.to_string()));
            }
        }
    } else {
        for name in &args.names {
            host.load_name(name)?;
        }
    }
    for (path, why) in &skipped {
        eprintln!("warning: skipped {}: {why}", path.display());
    }
    if host.plugins().is_empty() {
        bail!(
            "no plugins found in {} (build them with `cargo build --release --workspace`, then \
             pass --plugin-dir target/release or set {PLUGIN_PATH_ENV})",
            if dirs.is_empty() {
                "no search folder".to_string()
            } else {
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    let owned = |p: &PluginHandle, names: Vec<String>| -> Vec<String> {
        let prefix = format!("{}/", p.name());
        names
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    };
    let rows: Vec<serde_json::Value> = host
        .plugins()
        .iter()
        .map(|p| {
            json!({
                "name": p.name(),
                "version": p.manifest().version,
                "description": p.manifest().description,
                "source": source(p),
                "formats": owned(p, host.format_names()),
                "evaluators": owned(p, host.evaluator_names()),
                "presets": owned(p, host.preset_names()),
                "experts": owned(p, host.expert_names()),
            })
        })
        .collect();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let list = |v: &serde_json::Value| -> String {
        let names: Vec<&str> = v
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            "-".into()
        } else {
            names.join(", ")
        }
    };
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r["name"].as_str().unwrap_or_default().to_string(),
                r["version"].as_str().unwrap_or_default().to_string(),
                list(&r["formats"]),
                list(&r["evaluators"]),
                list(&r["presets"]),
                list(&r["experts"]),
                r["source"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    out!(
        "{}",
        crate::text::table(
            &[
                "plugin",
                "version",
                "formats",
                "evaluators",
                "presets",
                "experts",
                "source"
            ],
            &table,
        )
    );
    Ok(())
}
