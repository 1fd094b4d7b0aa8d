//! Serve a model folder with PEFT adapters on the CPU (what `legora serve` does, without
//! the CLI's other flags):
//!
//! ```text
//! cargo run -p legora-serve --example serve -- MODEL_DIR [ADDR] [NAME=ADAPTER_DIR ...]
//! ```

use std::path::PathBuf;

use burn::backend::Flex;
use legora_hub::PretrainedModel;
use legora_serve::ServeOptions;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("MODEL_DIR"))?);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8000".into());
    let mut opts = ServeOptions::new(addr.parse()?);
    for a in args {
        let (name, dir) = a
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{a}: expected NAME=DIR"))?;
        opts.adapters.push((name.into(), dir.into()));
    }
    let model = PretrainedModel::<Flex>::from_pretrained(&model_dir, &Default::default())?;
    let server = legora_serve::start(model, opts)?;
    eprintln!("listening on http://{}", server.addr());
    server.wait()?;
    Ok(())
}
