//! pest's errors in readable words: what was expected, what was found, and where.

use super::Rule;
use crate::diag::{Diagnostic, Span};
use pest::error::{ErrorVariant, InputLocation};

/// Converts a pest error into a located diagnostic. Never shows a `Rule` debug name.
pub(super) fn from_pest(err: &pest::error::Error<Rule>, src: &str) -> Diagnostic {
    let pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let found = found_at(src, pos);
    let span = Span::new(pos, pos + found.len().max(usize::from(pos < src.len())));
    let expected = match &err.variant {
        ErrorVariant::ParsingError { positives, .. } => describe(positives),
        ErrorVariant::CustomError { message } => message.clone(),
    };
    let found_text = if found.is_empty() {
        "the end of the file".to_owned()
    } else if found == "\n" {
        "the end of the line".to_owned()
    } else {
        format!("`{found}`")
    };
    let message = format!("expected {expected}, found {found_text}");
    let mut diag = Diagnostic::error(message.clone()).label(span, format!("expected {expected}"));
    if let Some(help) = help_for(src, pos, &found) {
        diag = diag.help(help);
    }
    diag
}

/// The token at `pos`: a word, a number, or one character.
fn found_at(src: &str, pos: usize) -> String {
    let rest = src.get(pos..).unwrap_or("");
    let mut chars = rest.chars();
    match chars.next() {
        None => String::new(),
        Some(c) if c.is_alphanumeric() || c == '_' => {
            rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.').collect()
        }
        Some('\r') | Some('\n') => "\n".to_owned(),
        Some(c) => c.to_string(),
    }
}

fn describe(rules: &[Rule]) -> String {
    let mut words: Vec<&str> = Vec::new();
    for r in rules {
        let w = rule_words(*r);
        if !words.contains(&w) {
            words.push(w);
        }
    }
    match words.as_slice() {
        [] => "something else".to_owned(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Readable names for the grammar's rules.
fn rule_words(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "the end of the file",
        Rule::file | Rule::model | Rule::kw_model => "`model NAME { … }`",
        Rule::model_item => "a model item (`input`, `target`, `encoder`, `decoder` or `loss`)",
        Rule::input_decl | Rule::kw_input => "`input`",
        Rule::target_decl | Rule::kw_target => "`target`",
        Rule::condition_decl | Rule::kw_condition => "`condition`",
        Rule::encoder | Rule::kw_encoder => "`encoder`",
        Rule::decoder | Rule::kw_decoder => "`decoder`",
        Rule::loss_decl | Rule::kw_loss => "`loss`",
        Rule::train | Rule::kw_train => "`train { … }`",
        Rule::type_expr => "a type (`[8]`, `[1, 28, 28]` or `seq[20] of token[16]`)",
        Rule::seq_type | Rule::kw_seq => "`seq[N] of …`",
        Rule::at_most => "`<=`",
        Rule::kw_of => "`of`",
        Rule::token_type | Rule::kw_token => "`token[V]`",
        Rule::shape => "a shape such as `[1, 28, 28]`",
        Rule::mirror | Rule::kw_mirror => "`mirror`",
        Rule::kw_tied => "`tied`",
        Rule::mirror_skip | Rule::kw_skip => "`skip concat` or `skip add`",
        Rule::layer_name | Rule::kw_as => "`as NAME`",
        Rule::layer | Rule::layer_kind => "a layer (`dense 32`, `conv 16 k3`, …)",
        Rule::layer_block => "`{`",
        Rule::layer_arg => "a layer argument",
        Rule::activation => "`-> activation`",
        Rule::loss_term => "a loss such as `mse(x)`",
        Rule::field | Rule::field_name => "a train field (`data`, `batch`, `epochs`, …)",
        Rule::binding => "a name",
        Rule::call => "a call such as `sgd(lr: 0.1)`",
        Rule::call_args => "`(`",
        Rule::arg | Rule::arg_name => "an argument",
        Rule::value => "a value",
        Rule::fraction => "a fraction",
        Rule::list => "a list such as `[30, 60]`",
        Rule::name | Rule::word => "a name",
        Rule::int => "a whole number",
        Rule::number => "a number",
        Rule::string => "a quoted string",
        Rule::colon => "`:`",
        Rule::lbrace => "`{`",
        Rule::rbrace => "`}`",
        Rule::rbracket => "`]`",
        Rule::rparen => "`)`",
        Rule::WHITESPACE | Rule::COMMENT | Rule::nl | Rule::sep | Rule::boundary => "a new line or `;`",
    }
}

/// A sentence of advice for common slips, judged from the text around the error.
fn help_for(src: &str, pos: usize, found: &str) -> Option<String> {
    let before = src.get(..pos).unwrap_or("");
    if found.is_empty() {
        let opens = src.matches('{').count();
        let closes = src.matches('}').count();
        if opens > closes {
            return Some(format!("{} `{{` not closed: add `}}`", opens - closes));
        }
        return None;
    }
    if found == "#" {
        return Some("comments start with `//` (or are written `/* … */`)".to_owned());
    }
    if found == "%" {
        let number: String = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if let Ok(x) = number.parse::<f64>() {
            return Some(format!("write a fraction: `{}` for {number}%", x / 100.0));
        }
        return Some("write a fraction, e.g. `0.1` for 10%".to_owned());
    }
    if found == "}" && src.matches('}').count() > src.matches('{').count() {
        return Some("this `}` closes nothing: remove it".to_owned());
    }
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before[line_start..].trim_start();
    let first_word: String = line.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    let blocks = ["encoder", "decoder", "train", "loss", "input", "target"];
    let above = &before[..line_start];
    if blocks.contains(&first_word.as_str()) && above.matches('{').count() > above.matches('}').count() + 1 {
        return Some(format!(
            "`{first_word}` starts a new part, but the block above is still open: add its `}}`"
        ));
    }
    if super::build::is_layer_keyword(found) {
        return Some("put each layer on its own line, or separate them with `;`".to_owned());
    }
    let trimmed = before.trim_end();
    if trimmed.ends_with("->") {
        return Some("activations are relu, sigmoid, tanh, softmax, leaky_relu(a) and identity".to_owned());
    }
    None
}
