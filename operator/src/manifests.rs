//! Reading manifest streams as `kubectl`, `kustomize build` and `helm template` write
//! them: multi-document YAML, split at its markers with the line each document starts
//! on, so a parse error names its line in the whole file.
//!
//! Why a splitter of our own: serde_norway's stream deserializer (which `render` uses,
//! naming a bad document by its number) does not say where each document starts, and
//! `validate` names every ChatService it reports as `file:line`.

use std::fmt;

/// An input that could not be read or parsed, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub file: String,
    /// 1-based line and column, when the parser knows them.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl InputError {
    /// A file (or standard input) that could not be read.
    pub fn io(file: &str, e: std::io::Error) -> Self {
        InputError {
            file: file.to_string(),
            position: None,
            message: format!("cannot read: {e}"),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// One YAML document of a stream, with the line it starts on.
#[derive(Debug, PartialEq, Eq)]
pub struct Document<'a> {
    /// 1-based line of the whole stream the document starts on.
    pub first_line: usize,
    pub text: &'a str,
}

/// Splits a YAML stream at its `---` markers and after its `...` markers (which YAML
/// only allows at column 0 and never inside a document's content), remembering where
/// each document starts so a parser's position can be made absolute. `%YAML`/`%TAG`
/// directives stay with the document whose `---` follows them.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    // What the current chunk holds so far, besides blank lines and comments.
    let (mut has_directive, mut has_content) = (false, false);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start && (!has_directive || has_content) {
            docs.push(Document {
                first_line: start_line,
                text: &text[start..offset],
            });
            start = offset;
            start_line = index + 1;
            (has_directive, has_content) = (false, false);
        }
        if bare.starts_with('%') && !has_content {
            has_directive = true;
        } else if !(bare.trim().is_empty() || bare.starts_with('#')) {
            has_content = true;
        }
        offset += line.len();
        if bare == "..." {
            docs.push(Document {
                first_line: start_line,
                text: &text[start..offset],
            });
            start = offset;
            start_line = index + 2;
            (has_directive, has_content) = (false, false);
        }
    }
    if start < text.len() {
        docs.push(Document {
            first_line: start_line,
            text: &text[start..],
        });
    }
    docs
}

/// A parse error of `doc` (a document of `file`), its position made absolute.
pub fn parse_error(file: &str, doc: &Document<'_>, e: &serde_norway::Error) -> InputError {
    // serde_norway appends " at line L column C" to its message; the position is
    // given separately here, relative to the whole file.
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    InputError {
        file: file.to_string(),
        position: e
            .location()
            .map(|l| (doc.first_line + l.line() - 1, l.column())),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_at_markers_with_their_first_line() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n";
        let docs = documents(text);
        assert_eq!(
            docs,
            vec![
                Document {
                    first_line: 1,
                    text: "a: 1\n"
                },
                Document {
                    first_line: 2,
                    text: "---\nb: 2\n"
                },
                Document {
                    first_line: 4,
                    text: "--- # c\nc: 3\n"
                },
            ]
        );
        assert_eq!(documents("---\na: 1\n").len(), 1);
        assert_eq!(
            documents("%YAML 1.2\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n"),
            vec![
                Document {
                    first_line: 1,
                    text: "%YAML 1.2\n---\na: 1\n...\n"
                },
                Document {
                    first_line: 5,
                    text: "%YAML 1.2\n---\nb: 2\n"
                },
            ]
        );
        for doc in documents("%YAML 1.2\n---\na: 1\n...\n%YAML 1.2\n---\nb: 2\n") {
            serde_norway::from_str::<serde_norway::Value>(doc.text).expect("one document each");
        }
        assert!(documents("").is_empty());
    }
}
