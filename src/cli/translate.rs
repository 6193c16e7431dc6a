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
    #[command(flatten)]
    search: SearchArgs,
    /// With an `attention` layer: write its weights, `[sentences, target length, source
    /// length]` f32 (0 past a sentence's end), to this .npy file.
    #[arg(long)]
    attention: Option<PathBuf>,
    /// With an `attention` layer: draw the weights of the first four sentences as heat maps
    /// (source words across, translated words down) into this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
}

/// How a sequence model decodes: `aec translate`'s and `aec run`'s `--beam` and `--alpha`.
#[derive(clap::Args, Clone)]
pub struct SearchArgs {
    /// Beam search with K hypotheses per sentence (1: greedy decoding); `aec run --train`
    /// decodes each epoch's validation so.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub beam: u64,
    /// The length penalty's exponent α of beam search (GNMT's ((5 + |Y|) / 6)^α; 0: none),
    /// from 0 to 5.
    #[arg(long, default_value_t = 0.6, value_parser = alpha)]
    pub alpha: f64,
}

fn alpha(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(a) if (0.0..=5.0).contains(&a) => Ok(a),
        _ => Err(format!("`{s}` is not a number from 0 to 5")),
    }
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
    let (Some(source), Some(target)) = (vocab.columns.first(), vocab.target()) else {
        return Err(Failure::Data(format!("{}: no vocabulary", vocab_path.display())));
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
    let encoder = source.encoder();
    for (i, s) in sentences.iter().enumerate() {
        let t = tokens.split(s);
        let encoded = encoder.encode(&t, len).ok_or_else(|| {
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
    let record = args.attention.is_some() || args.png.is_some();
    if record && args.search.beam > 1 {
        return Err(Failure::Io("--attention and --png draw greedy decoding's weights: drop --beam".into()));
    }
    if record && !aec::sema::lower::attends(model) {
        return Err(Failure::Io(format!(
            "--attention and --png draw an `attention` layer's weights, and {} has none",
            args.spec.display()
        )));
    }
    for (flag, path) in [("--attention", &args.attention), ("--png", &args.png)] {
        if let Some(p) = path {
            super::run::check_file_path(flag, p)?;
        }
    }
    let batch = 64;
    let mut out = String::new();
    let mut weights: Vec<f32> = Vec::new();
    // Each translation's tokens, for the heat maps' labels.
    let mut written: Vec<Vec<String>> = Vec::new();
    for (chunk, text) in ids.chunks(batch * len).zip(sentences.chunks(batch)) {
        let b = text.len();
        // The encoder reads the input alone; the other variables (the target) stay empty.
        let mut inputs = vec![Buf::I32(chunk.to_vec())];
        inputs.extend((1..model.inputs.len() + model.targets.len()).map(|_| Buf::I32(Vec::new())));
        if record {
            d.weights = Some(Vec::new());
        }
        let got = d
            .decode_beam(&params, &inputs, b, (args.search.beam as usize, args.search.alpha))
            .map_err(Failure::Data)?;
        weights.extend(d.weights.take().unwrap_or_default());
        for (row, s) in got.chunks(d.len).zip(text) {
            // A blank line stays blank.
            if s.trim().is_empty() {
                out.push('\n');
                written.push(Vec::new());
                continue;
            }
            let words = target.decode(row);
            out.push_str(&tokens.join(&words));
            out.push('\n');
            written.push(words.into_iter().map(str::to_owned).collect());
        }
    }
    print!("{out}");
    let n = sentences.len();
    let per = weights.len() / n.max(1);
    if let Some(path) = &args.attention {
        let shape = vec![n, d.len, per / d.len.max(1)];
        let a = aec::data::Array { shape, values: aec::data::Values::F32(weights.clone()) };
        aec::data::write_npy(path, &a).map_err(|e| Failure::Io(e.to_string()))?;
        eprintln!("attention weights: {} ({n} × {} × {})", path.display(), d.len, per / d.len.max(1));
    }
    if let Some(path) = &args.png {
        let maps: Vec<super::plot::Heat> = (0..n.min(4))
            .map(|i| {
                let source: Vec<String> =
                    tokens.split(&sentences[i]).into_iter().chain(["</s>".to_owned()]).collect();
                let target: Vec<String> = written[i].iter().cloned().chain(["</s>".to_owned()]).collect();
                let s = per / d.len.max(1);
                let rows = (0..target.len().min(d.len))
                    .map(|t| weights[i * per + t * s..][..source.len().min(s)].to_vec())
                    .collect();
                super::plot::Heat { across: source, down: target, rows }
            })
            .collect();
        super::plot::attention_png(path, &maps).map_err(Failure::Io)?;
        eprintln!("attention heat maps: {}", path.display());
    }
    Ok(())
}
