//! Diagnostics as data.
//!
//! Every stage reports problems as [`Diagnostic`] values: a message, labelled source spans,
//! notes (such as a shape trace) and an optional `help` with the fix. Nothing here knows the
//! AST or the IR, and nothing here prints: [`render`] turns diagnostics into text for the CLI
//! and the snapshot tests, through miette.

use std::fmt;

/// A byte range in the source text of one spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start: clamp_u32(start), end: clamp_u32(end.max(start)) }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }

    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }

    /// 1-based line and column of the span's start in `src`.
    pub fn line_col(self, src: &str) -> (usize, usize) {
        let start = (self.start as usize).min(src.len());
        let before = &src[..floor_char_boundary(src, start)];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

/// Where a source's lines start: the line of many spans, each found in log time (counting
/// newlines per span is quadratic on a long file).
pub struct Lines(Vec<usize>);

impl Lines {
    pub fn new(src: &str) -> Lines {
        Lines(std::iter::once(0).chain(src.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }

    /// The 1-based line of the span's start.
    pub fn line(&self, span: Span) -> usize {
        self.0.partition_point(|&at| at <= span.start as usize)
    }
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// The first label is the primary location.
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(message) }
    }

    pub fn label(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label { span, message: message.into() });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary span, if the diagnostic has a location.
    pub fn span(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }
}

/// Renders diagnostics as text: `file:line:col`, the source line with the span underlined,
/// labels, notes and help. Colour only when `color` is set (the CLI on a terminal).
pub fn render(diags: &[Diagnostic], file_name: &str, src: &str, color: bool) -> String {
    let theme =
        if color { miette::GraphicalTheme::unicode() } else { miette::GraphicalTheme::unicode_nocolor() };
    let handler = miette::GraphicalReportHandler::new_themed(theme).with_width(100).with_context_lines(1);
    let mut out = String::new();
    for d in diags {
        // Lines too long to show (miette cannot pad past column 65,535) are shown around the
        // labels on them; the note gives the true column.
        let view = Window::of(src, d);
        let shown = Diagnostic { labels: view.labels.clone(), ..d.clone() };
        let report = Report { diag: &shown, src: miette::NamedSource::new(file_name, view.text) };
        if handler.render_report(&mut out, &report).is_err() {
            // Rendering into a String cannot fail; keep the message in any case.
            out.push_str(&d.message);
        }
        // miette has no notes; they follow its report, indented like its help.
        for note in view.notes.iter().chain(&d.notes) {
            out.push_str(&format!("  note: {}\n", wrap(note, 90, "        ")));
        }
        // miette puts the location in the box header only; a plain `path:line:col` line
        // makes the location clickable and greppable.
        out.push('\n');
    }
    out
}

/// Lines longer than this many bytes are shown as a window around their labels.
const MAX_SHOWN_LINE: usize = 240;

/// The source as one diagnostic shows it: every line longer than [`MAX_SHOWN_LINE`] cut to a
/// window around the first label on it (or its start), the labels moved to match.
struct Window {
    text: String,
    labels: Vec<Label>,
    notes: Vec<String>,
}

impl Window {
    fn of(src: &str, d: &Diagnostic) -> Window {
        if src.lines().all(|l| l.len() <= MAX_SHOWN_LINE) {
            return Window { text: src.to_owned(), labels: d.labels.clone(), notes: Vec::new() };
        }
        // Each line as (its start in `src`, the kept range `from..to` of `src`, where that range
        // starts in `text`).
        let mut text = String::with_capacity(src.len().min(1 << 20));
        let mut kept: Vec<(usize, usize, usize, usize)> = Vec::new();
        let mut notes = Vec::new();
        let mut start = 0;
        for (number, line) in src.split_inclusive('\n').enumerate() {
            let body = line.trim_end_matches(['\n', '\r']);
            let end = start + body.len();
            let (from, to) = if body.len() <= MAX_SHOWN_LINE {
                (start, end)
            } else {
                let anchor = d
                    .labels
                    .iter()
                    .map(|l| l.span.start as usize)
                    .find(|&p| (start..=end).contains(&p))
                    .unwrap_or(start);
                let from = floor_char_boundary(src, anchor.saturating_sub(MAX_SHOWN_LINE / 3).max(start));
                let to = floor_char_boundary(src, (from + MAX_SHOWN_LINE).min(end));
                if d.labels.iter().any(|l| (start..=end).contains(&(l.span.start as usize))) {
                    let col = src[start..anchor.min(end)].chars().count() + 1;
                    notes.push(format!(
                        "line {} is {} characters long; it is shown around column {col}",
                        number + 1,
                        body.chars().count()
                    ));
                }
                (from, to)
            };
            let prefix = if from > start { "…" } else { "" };
            text.push_str(prefix);
            let at = text.len();
            text.push_str(&src[from..to]);
            if to < end {
                text.push('…');
            }
            text.push_str(&line[body.len()..]);
            kept.push((start, from, to, at));
            start += line.len();
        }
        // An offset of `src` in `text`: inside its line's window, or at the window's edge.
        let map = |p: usize| -> usize {
            let i = kept.partition_point(|k| k.0 <= p).saturating_sub(1);
            match kept.get(i) {
                Some(&(_, from, to, at)) => at + p.clamp(from, to) - from,
                None => 0,
            }
        };
        let labels = d
            .labels
            .iter()
            .map(|l| {
                let s = map(l.span.start as usize);
                let e = map(l.span.end as usize).max(s);
                Label { span: Span::new(s, e), message: l.message.clone() }
            })
            .collect();
        Window { text, labels, notes }
    }
}

/// A one-line `file:line:col: error: message` form, for logs and tests.
pub fn render_short(d: &Diagnostic, file_name: &str, src: &str) -> String {
    let kind = if d.is_error() { "error" } else { "warning" };
    match d.span() {
        Some(span) => {
            let (line, col) = span.line_col(src);
            format!("{file_name}:{line}:{col}: {kind}: {}", d.message)
        }
        None => format!("{file_name}: {kind}: {}", d.message),
    }
}

struct Report<'a> {
    diag: &'a Diagnostic,
    src: miette::NamedSource<String>,
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diag.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        let help = self.diag.help.as_ref()?;
        Some(Box::new(Raw(help.clone())))
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        if self.diag.labels.is_empty() { None } else { Some(&self.src) }
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        if self.diag.labels.is_empty() {
            return None;
        }
        let labels = self.diag.labels.iter().enumerate().map(|(i, l)| {
            let text = (!l.message.is_empty()).then(|| l.message.clone());
            let span = (l.span.start as usize, l.span.len());
            if i == 0 {
                miette::LabeledSpan::new_primary_with_span(text, span)
            } else {
                miette::LabeledSpan::new_with_span(text, span)
            }
        });
        Some(Box::new(labels))
    }
}

/// Wraps `text` at word boundaries to `width`, indenting continuation lines.
fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in text.split(' ') {
        if line_len > 0 && line_len + 1 + word.chars().count() > width {
            out.push('\n');
            out.push_str(indent);
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.chars().count();
    }
    out
}

struct Raw(String);

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
