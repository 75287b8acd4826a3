//! Replays the committed fuzz corpus (`fuzz/corpus/`) through the entry points the
//! fuzz targets drive (`chatgate_service::fuzzing`), on the stable toolchain, so every
//! seed and every crash once found stays a regular test in `make test`.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let data = std::fs::read(&path).expect("a corpus file");
            (path, data)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no seed", dir.display());
    inputs
}

fn replay(target: &str, entry: fn(&[u8])) {
    for (path, data) in corpus(target) {
        eprintln!("{}", path.display());
        entry(&data);
    }
}

#[test]
fn the_client_frame_corpus_replays() {
    replay("client_frame", chatgate_service::fuzzing::client_frame);
}

#[test]
fn the_credentials_corpus_replays() {
    replay("credentials", chatgate_service::fuzzing::credentials);
}

#[test]
fn the_config_corpus_replays() {
    replay("config", chatgate_service::fuzzing::config_file);
}

#[test]
fn the_sse_corpus_replays_and_its_seed_reply_parses() {
    replay("sse", chatgate_service::fuzzing::sse);
    // The entry point really parses: the seed reply yields its two deltas.
    let reply = corpus("sse")
        .into_iter()
        .find(|(p, _)| p.ends_with("reply"))
        .expect("the reply seed")
        .1;
    let deltas: Vec<String> = chatgate_service::llm::parse_sse_body(&[&reply])
        .into_iter()
        .map(|d| d.expect("a delta"))
        .collect();
    assert_eq!(deltas, ["Hel", "lo"]);
}
