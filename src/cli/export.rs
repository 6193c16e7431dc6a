//! `aec export`: a trained network (or its encoder or decoder) as an ONNX file.

use super::Failure;
use super::run;
use aec::onnx::{self, Export};
use prost::Message;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The `.ae` spec.
    spec: PathBuf,
    /// Trained parameters (a checkpoint.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Where to write the ONNX model.
    #[arg(long)]
    onnx: PathBuf,
    /// Which part: the whole network (input → reconstruction and code), the encoder (input →
    /// code), the decoder (code → reconstruction), or a teacher-forced decoder's one step
    /// (previous token and state → output and state; greedy decoding loops over it).
    #[arg(long, value_enum, default_value_t = PartArg::Model)]
    part: PartArg,
    /// The ONNX opset (14 to 21).
    #[arg(long, default_value_t = onnx::DEFAULT_OPSET)]
    opset: i64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PartArg {
    Model,
    Encoder,
    Decoder,
    Step,
}

pub fn export(args: &ExportArgs) -> Result<(), Failure> {
    run::check_file_path("--onnx", &args.onnx)?;
    if !onnx::OPSETS.contains(&args.opset) {
        return Err(Failure::Io(format!(
            "--opset {}: aec writes opsets {} to {}",
            args.opset,
            onnx::OPSETS.start(),
            onnx::OPSETS.end()
        )));
    }
    let spec = run::load_spec(&args.spec, None)?;
    let params = run::load_weights(&spec, &args.weights)?;
    let part = match args.part {
        PartArg::Model => Export::Model,
        PartArg::Encoder => Export::Encoder,
        PartArg::Decoder => Export::Decoder,
        PartArg::Step => Export::Step,
    };
    let model = onnx::export(&spec.compiled.model, &params, part, args.opset)
        .map_err(|e| Failure::Data(format!("{}: {e}", spec.path.display())))?;
    let problems = onnx::verify(&model);
    if !problems.is_empty() {
        return Err(Failure::Data(format!(
            "the exported graph is malformed (a bug in aec): {}",
            problems.join("; ")
        )));
    }
    aec::files::write_atomic(&args.onnx, &model.encode_to_vec())
        .map_err(|e| Failure::Io(format!("cannot write {}: {e}", args.onnx.display())))?;
    let g = model.graph.unwrap_or_default();
    let names = |v: &[onnx::proto::ValueInfoProto]| {
        v.iter().filter_map(|i| i.name.clone()).collect::<Vec<_>>().join(", ")
    };
    let floats: usize = g.initializer.iter().map(|t| t.raw_data.as_ref().map_or(0, Vec::len) / 4).sum();
    eprintln!(
        "wrote {}: opset {}, {} nodes, {} initializers ({floats} parameters); inputs {} → outputs {}",
        args.onnx.display(),
        args.opset,
        g.node.len(),
        g.initializer.len(),
        names(&g.input),
        names(&g.output)
    );
    Ok(())
}
