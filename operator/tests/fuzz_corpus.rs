//! Replays the committed `validate` fuzz corpus (`fuzz/corpus/validate/`) through the
//! entry point the fuzz target drives, on the stable toolchain (`make test`).

use std::path::PathBuf;

#[test]
fn the_validate_corpus_replays() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/validate");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("the validate corpus") {
        let path = entry.expect("a corpus entry").path();
        eprintln!("{}", path.display());
        chatgate_operator::validate_cmd::fuzz_validate(&std::fs::read(&path).expect("a seed"));
        seen += 1;
    }
    assert!(seen > 0, "{} holds no seed", dir.display());
    // The entry point really validates: the staging example is read as a ChatService.
    let staging = std::fs::read_to_string(dir.join("staging")).expect("the staging seed");
    let report = chatgate_operator::validate_cmd::validate_manifests(&staging).expect("it reads");
    assert!(
        report.table().contains("chat-staging/chat"),
        "{}",
        report.table()
    );
}
