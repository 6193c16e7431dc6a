//! `aec translate`: sentences in, translations out, through a trained sequence model and the
//! vocabularies its run saved beside the checkpoint (`vocab.json`).

use super::Failure;
use super::run::{Backend, load_spec, load_weights, threads};
use aec::data::text::{TextVocab, VOCAB_FILE};
use aec::interp::Buf;
use aec::runtime::decode::Decoder;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TranslateArgs {
    /// The `.ae` spec (a text model: `seq[<= N] of token[V]` input and target).
    spec: PathBuf,
    /// Trained parameters; `vocab.json` must be beside them (a run folder has both).
    #[arg(long)]
    weights: PathBuf,
    /// Sentences to translate.
    sentences: Vec<String>,
    /// A file of sentences, one per line (blank lines are kept as blank lines).
    #[arg(long)]
    input: Option<PathBuf>,
    /// The executor: native code (`jit`) or the reference interpreter (`interp`).
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
}

pub fn translate(args: &TranslateArgs) -> Result<(), Failure> {
    let spec = load_spec(&args.spec, None)?;
    let model = &spec.compiled.model;
    let (Some(input), true) = (model.inputs.first(), model.inputs.first().is_some_and(|v| v.padded)) else {
        return Err(Failure::Data(format!(
            "{}: `aec translate` reads text into a `seq[<= N] of token[V]` input, and this model has none",
            args.spec.display()
        )));
    };
    let aec::sema::Ty::Tokens { len, .. } = input.ty else {
        return Err(Failure::Data(format!("{}: the input is not a sequence of tokens", args.spec.display())));
    };
    let len = len as usize;
    let vocab_path = args.weights.parent().unwrap_or(std::path::Path::new(".")).join(VOCAB_FILE);
    let vocab = TextVocab::read(&vocab_path).map_err(|e| {
        Failure::Data(format!("{e} (the vocabularies of the run that trained {})", args.weights.display()))
    })?;
    let tokens = vocab
        .tokenizer()
        .ok_or_else(|| Failure::Data(format!("{}: unknown tokenizer", vocab_path.display())))?;
    let (source, target) = match vocab.columns.as_slice() {
        [s, t, ..] if !t.tokens.is_empty() => (s, t),
        [s, ..] => (s, s),
        [] => return Err(Failure::Data(format!("{}: no vocabulary", vocab_path.display()))),
    };
    let mut sentences = args.sentences.clone();
    if let Some(path) = &args.input {
        let text =
            std::fs::read_to_string(path).map_err(|e| Failure::Io(format!("{}: {e}", path.display())))?;
        sentences.extend(text.lines().map(str::to_owned));
    }
    if sentences.is_empty() {
        return Err(Failure::Io("give sentences to translate, or --input FILE".into()));
    }
    let params = load_weights(&spec, &args.weights)?;
    let mut ids = Vec::with_capacity(sentences.len() * len);
    for (i, s) in sentences.iter().enumerate() {
        let t = tokens.split(s);
        let encoded = source.encode(&t, len).ok_or_else(|| {
            Failure::Data(format!(
                "sentence {} has {} tokens; the model reads at most {} (seq[<= {len}] with its end token)",
                i + 1,
                t.len(),
                len - 1
            ))
        })?;
        ids.extend(encoded);
    }
    let threads = threads(args.threads);
    let mut d = Decoder::new(&spec.compiled, args.backend.runtime(), threads).ok_or_else(|| {
        Failure::Data(format!(
            "{}: the decoder is not teacher-forced: nothing to translate with",
            args.spec.display()
        ))
    })?;
    let batch = 64;
    let mut out = String::new();
    for (chunk, text) in ids.chunks(batch * len).zip(sentences.chunks(batch)) {
        let b = text.len();
        // The encoder reads the input alone; the other variables (the target) stay empty.
        let mut inputs = vec![Buf::I32(chunk.to_vec())];
        inputs.extend((1..model.inputs.len() + model.targets.len()).map(|_| Buf::I32(Vec::new())));
        let got = d.decode(&params, &inputs, b).map_err(Failure::Data)?;
        for (row, s) in got.chunks(d.len).zip(text) {
            // A blank line stays blank.
            if s.trim().is_empty() {
                out.push('\n');
                continue;
            }
            out.push_str(&tokens.join(&target.decode(row)));
            out.push('\n');
        }
    }
    print!("{out}");
    Ok(())
}
