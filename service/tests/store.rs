//! The thread store against real databases — SQLite files and in-memory databases,
//! and a real PostgreSQL server: isolation between users, persistence, ordering,
//! idempotent client message ids, paging, migrations, and which connection
//! failures are worth waiting for.

use chatgate_service::store::{PageLimit, Role, StoreError, ThreadStore};

async fn file_store(dir: &tempfile::TempDir) -> ThreadStore {
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    ThreadStore::connect(&url)
        .await
        .expect("open a SQLite file")
}

/// The contents of alice's thread `thread_id`, oldest first.
async fn thread_contents(store: &ThreadStore, thread_id: &str) -> Vec<String> {
    store
        .get_thread("alice", thread_id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect()
}

async fn memory_store() -> ThreadStore {
    ThreadStore::connect("sqlite::memory:")
        .await
        .expect("open an in-memory SQLite")
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, thread_id: &str) {
    match result {
        Err(StoreError::NotFound { thread_id: id }) => assert_eq!(id, thread_id),
        other => panic!("expected NotFound for {thread_id}, got {other:?}"),
    }
}

#[tokio::test]
async fn another_users_thread_is_indistinguishable_from_a_missing_one() {
    let store = memory_store().await;
    let thread = store.create_thread("alice", "secret plans").await.unwrap();
    store
        .append_message("alice", &thread.thread_id, Role::User, "hi", None)
        .await
        .unwrap();

    assert_not_found(
        store.get_thread("bob", &thread.thread_id).await,
        &thread.thread_id,
    );
    assert_not_found(
        store.get_thread("bob", "no-such-thread").await,
        "no-such-thread",
    );
    assert_not_found(
        store
            .append_message("bob", &thread.thread_id, Role::User, "mine now", None)
            .await,
        &thread.thread_id,
    );
    assert_not_found(
        store
            .post_user_message("bob", Some(&thread.thread_id), "mine now", None)
            .await,
        &thread.thread_id,
    );
    assert_not_found(
        store
            .append_reply("bob", &thread.thread_id, "reply", "m", "r")
            .await,
        &thread.thread_id,
    );
    assert!(store.list_threads("bob").await.unwrap().is_empty());

    // Nothing bob tried reached alice's thread.
    let messages = store.get_thread("alice", &thread.thread_id).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].content, "hi");
    let listed = store.list_threads("alice").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].thread_id, thread.thread_id);
    assert_eq!(listed[0].title, "secret plans");
}

#[tokio::test]
async fn file_database_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let posted = {
        let store = file_store(&dir).await;
        assert_eq!(store.backend(), "sqlite");
        let posted = store
            .post_user_message("alice", None, "remember me", Some("c-1"))
            .await
            .unwrap();
        store
            .append_reply(
                "alice",
                &posted.thread_id,
                "I will",
                &posted.message.message_id,
                "run-1",
            )
            .await
            .unwrap();
        store.close().await;
        posted
    };
    let store = file_store(&dir).await;
    let messages = store.get_thread("alice", &posted.thread_id).await.unwrap();
    let contents: Vec<_> = messages
        .iter()
        .map(|m| (m.role, m.content.as_str()))
        .collect();
    assert_eq!(
        contents,
        vec![(Role::User, "remember me"), (Role::Assistant, "I will")]
    );
    let threads = store.list_threads("alice").await.unwrap();
    assert_eq!(threads.len(), 1);
    assert_eq!(threads[0].title, "remember me");
    // The idempotency record survives too.
    let found = store
        .find_client_message("alice", "c-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.message_id, posted.message.message_id);
    assert_eq!(found.reply.unwrap().run_id, "run-1");
}

#[tokio::test]
async fn in_memory_databases_are_private_to_each_connect() {
    let a = memory_store().await;
    let b = memory_store().await;
    a.create_thread("alice", "t").await.unwrap();
    assert_eq!(a.list_threads("alice").await.unwrap().len(), 1);
    assert!(b.list_threads("alice").await.unwrap().is_empty());
}

#[tokio::test]
async fn messages_come_back_in_the_order_they_were_appended() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let thread = store.create_thread("alice", "t").await.unwrap();
    for i in 0..20 {
        let role = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        store
            .append_message("alice", &thread.thread_id, role, &format!("m{i}"), None)
            .await
            .unwrap();
    }
    let contents = thread_contents(&store, &thread.thread_id).await;
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(contents, expected);

    let tail: Vec<String> = store
        .recent_messages("alice", &thread.thread_id, 3)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(tail, vec!["m17", "m18", "m19"]);
}

#[tokio::test]
async fn concurrent_appends_to_one_thread_all_land_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let thread = store.create_thread("alice", "t").await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let thread_id = thread.thread_id.clone();
            tokio::spawn(async move {
                store
                    .append_message("alice", &thread_id, Role::User, &format!("m{i}"), None)
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let mut contents = thread_contents(&store, &thread.thread_id).await;
    contents.sort();
    let mut expected: Vec<String> = (0..16).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(contents, expected);
}

#[tokio::test]
async fn threads_are_listed_most_recently_updated_first() {
    let store = memory_store().await;
    let first = store.create_thread("alice", "first").await.unwrap();
    let second = store.create_thread("alice", "second").await.unwrap();
    let ids = |list: Vec<chatgate_service::store::ThreadSummary>| {
        list.into_iter().map(|t| t.title).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.list_threads("alice").await.unwrap()),
        vec!["second", "first"]
    );
    store
        .append_message("alice", &first.thread_id, Role::User, "bump", None)
        .await
        .unwrap();
    assert_eq!(
        ids(store.list_threads("alice").await.unwrap()),
        vec!["first", "second"]
    );
    let listed = store.list_threads("alice").await.unwrap();
    assert!(
        time::OffsetDateTime::parse(
            &listed[0].updated_at,
            &time::format_description::well_known::Rfc3339
        )
        .is_ok(),
        "updated_at is RFC 3339: {}",
        listed[0].updated_at
    );
    let _ = second;
}

#[tokio::test]
async fn a_new_thread_is_titled_after_its_first_line() {
    let store = memory_store().await;
    let long = format!("{}\nsecond line", "x".repeat(200));
    let posted = store
        .post_user_message("alice", None, &long, None)
        .await
        .unwrap();
    assert!(posted.created_thread);
    let title = &store.list_threads("alice").await.unwrap()[0].title;
    assert!(
        title.starts_with("xxxx") && title.chars().count() <= 81,
        "{title}"
    );
    assert!(!title.contains("second line"));
}

#[tokio::test]
async fn a_client_message_id_is_stored_once_per_user() {
    let store = memory_store().await;
    let first = store
        .post_user_message("alice", None, "do it once", Some("c-42"))
        .await
        .unwrap();

    // The retry, even into a new thread, stores nothing and points at the original.
    match store
        .post_user_message("alice", None, "do it once", Some("c-42"))
        .await
    {
        Err(StoreError::Duplicate {
            client_message_id,
            existing,
        }) => {
            assert_eq!(client_message_id, "c-42");
            assert_eq!(existing.thread_id, first.thread_id);
            assert_eq!(existing.message_id, first.message.message_id);
            assert!(existing.reply.is_none());
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    match store
        .append_message("alice", &first.thread_id, Role::User, "again", Some("c-42"))
        .await
    {
        Err(StoreError::Duplicate { .. }) => {}
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(
        store.list_threads("alice").await.unwrap().len(),
        1,
        "no empty thread left behind"
    );
    assert_eq!(
        store
            .get_thread("alice", &first.thread_id)
            .await
            .unwrap()
            .len(),
        1
    );

    // Client ids are per user: bob may use the same one.
    store
        .post_user_message("bob", None, "mine", Some("c-42"))
        .await
        .unwrap();
    assert!(
        store
            .find_client_message("bob", "nope")
            .await
            .unwrap()
            .is_none()
    );

    // Once answered, the lookup finds the reply and the run that wrote it.
    let reply = store
        .append_reply(
            "alice",
            &first.thread_id,
            "done",
            &first.message.message_id,
            "run-9",
        )
        .await
        .unwrap();
    let found = store
        .find_client_message("alice", "c-42")
        .await
        .unwrap()
        .unwrap();
    let stored_reply = found.reply.expect("the reply is linked");
    assert_eq!(stored_reply.message_id, reply.message_id);
    assert_eq!(stored_reply.run_id, "run-9");
}

#[tokio::test]
async fn unreachable_postgres_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let error = ThreadStore::connect(&format!("postgres://chat:pw@127.0.0.1:{port}/x"))
        .await
        .expect_err("nothing listens on the port");
    assert!(error.is_transient(), "{error:?}");
    let text = error.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("pw"), "the password never appears: {text}");
}

#[tokio::test]
async fn unsupported_or_malformed_urls_are_permanent_and_name_the_key() {
    for url in [
        "mysql://user:pw@localhost/db",
        "garbage",
        "",
        "redis://localhost",
        "postgres://user:pw@host:notaport/db",
    ] {
        let error = ThreadStore::connect(url)
            .await
            .expect_err("not a usable database URL");
        assert!(!error.is_transient(), "{url}: {error:?}");
        let text = error.to_string();
        assert!(text.contains("CHATGATE_DATABASE_URL"), "{url}: {text}");
        assert!(
            !text.contains("pw"),
            "{url}: the password never appears: {text}"
        );
    }
    let text = ThreadStore::connect("mysql://x")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("sqlite://") && text.contains("postgres://"),
        "says what to use: {text}"
    );
}

#[tokio::test]
async fn missing_sqlite_directory_is_permanent_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-there");
    let url = format!("sqlite://{}", missing.join("chat.db").display());
    let error = ThreadStore::connect(&url).await.unwrap_err();
    assert!(!error.is_transient());
    let text = error.to_string();
    assert!(
        text.contains("not-there") && text.contains("CHATGATE_DATABASE_URL"),
        "{text}"
    );
}

#[tokio::test]
async fn ping_answers_on_a_working_store() {
    let dir = tempfile::tempdir().unwrap();
    file_store(&dir).await.ping().await.unwrap();
    memory_store().await.ping().await.unwrap();
}

/// Pages of a thread too big for one frame: every message arrives exactly once, in
/// order, no page over its byte budget (one oversized message alone excepted).
async fn pages_cover_a_big_thread(store: &ThreadStore) {
    let posted = store
        .post_user_message("alice", None, "first", None)
        .await
        .unwrap();
    let mut expected = vec!["first".to_owned()];
    for i in 0..60 {
        // About 300 KiB in all: far over one default frame (64 KiB).
        let content = format!("{i:03}-{}", "x".repeat(5_000));
        store
            .append_message("alice", &posted.thread_id, Role::User, &content, None)
            .await
            .unwrap();
        expected.push(content);
    }
    let limit = PageLimit {
        items: 50,
        bytes: 64 * 1024,
    };
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = store
            .thread_page("alice", &posted.thread_id, limit, cursor.as_deref())
            .await
            .unwrap();
        let json = serde_json::to_string(&page.items).unwrap();
        assert!(
            json.len() <= limit.bytes || page.items.len() == 1,
            "a page of {} bytes",
            json.len()
        );
        cursor = page.next_cursor.clone();
        pages.push(page.items);
        if cursor.is_none() {
            break;
        }
    }
    assert!(pages.len() > 4, "{} pages", pages.len());
    // Pages run newest to oldest; each page is oldest first.
    let seen: Vec<String> = pages
        .into_iter()
        .rev()
        .flatten()
        .map(|m| m.content)
        .collect();
    assert_eq!(seen, expected);

    let small = store
        .thread_page(
            "alice",
            &posted.thread_id,
            PageLimit {
                items: 2,
                bytes: 1 << 20,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(small.items.len(), 2);
    assert_eq!(small.items[1].content, expected[60]);
    assert!(matches!(
        store
            .thread_page("alice", &posted.thread_id, limit, Some("not-a-cursor"))
            .await,
        Err(StoreError::BadCursor)
    ));
    assert_not_found(
        store
            .thread_page("bob", &posted.thread_id, limit, None)
            .await,
        &posted.thread_id,
    );
}

/// Pages of the thread list: most recently updated first, each thread once, even
/// when a thread is updated between pages.
async fn pages_cover_many_threads(store: &ThreadStore) {
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            store
                .create_thread("carol", &format!("thread {i}"))
                .await
                .unwrap()
                .thread_id,
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let limit = PageLimit {
        items: 3,
        bytes: 1 << 20,
    };
    let first = store.threads_page("carol", limit, None).await.unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.items[0].thread_id, ids[6]);
    let mut seen: Vec<String> = first.items.iter().map(|t| t.thread_id.clone()).collect();
    let mut cursor = first.next_cursor.clone();
    while let Some(c) = cursor {
        let page = store.threads_page("carol", limit, Some(&c)).await.unwrap();
        seen.extend(page.items.iter().map(|t| t.thread_id.clone()));
        cursor = page.next_cursor;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    assert!(matches!(
        store.threads_page("carol", limit, Some("x")).await,
        Err(StoreError::BadCursor)
    ));
}

#[tokio::test]
async fn sqlite_pages_big_threads_and_long_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    pages_cover_a_big_thread(&store).await;
    pages_cover_many_threads(&store).await;
}

/// The same store on a real PostgreSQL server (`chatgate_tests::Postgres`, which needs
/// PostgreSQL's server binaries: `make postgres`). A module of its own so that
/// `make unit-test` can leave out exactly these (`--skip postgres::`).
mod postgres {
    use super::*;
    use chatgate_tests::Postgres;

    /// Connects to a database of the test server, waiting out a server still starting.
    async fn connect_pg(url: &str) -> ThreadStore {
        let mut attempts = 0;
        loop {
            match ThreadStore::connect(url).await {
                Ok(store) => return store,
                Err(e) if e.is_transient() && attempts < 200 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connect to the test PostgreSQL: {e}"),
            }
        }
    }

    fn postgres() -> Postgres {
        Postgres::start().unwrap_or_else(|e| panic!("a PostgreSQL server for this test: {e:#}"))
    }

    #[tokio::test]
    async fn postgres_store_keeps_threads_per_user_in_order_and_once() {
        let pg = postgres();
        let store = connect_pg(&pg.default_url()).await;
        assert_eq!(store.backend(), "postgres");
        store.ping().await.unwrap();

        let posted = store
            .post_user_message("alice", None, "hello postgres", Some("c-1"))
            .await
            .unwrap();
        for i in 0..5 {
            store
                .append_message(
                    "alice",
                    &posted.thread_id,
                    Role::User,
                    &format!("m{i}"),
                    None,
                )
                .await
                .unwrap();
        }
        store
            .append_reply(
                "alice",
                &posted.thread_id,
                "hi",
                &posted.message.message_id,
                "run-1",
            )
            .await
            .unwrap();
        let contents = thread_contents(&store, &posted.thread_id).await;
        assert_eq!(
            contents,
            vec!["hello postgres", "m0", "m1", "m2", "m3", "m4", "hi"]
        );

        assert_not_found(
            store.get_thread("bob", &posted.thread_id).await,
            &posted.thread_id,
        );
        assert_not_found(
            store
                .append_message("bob", &posted.thread_id, Role::User, "x", None)
                .await,
            &posted.thread_id,
        );
        assert!(store.list_threads("bob").await.unwrap().is_empty());

        match store
            .post_user_message("alice", None, "hello postgres", Some("c-1"))
            .await
        {
            Err(StoreError::Duplicate { existing, .. }) => {
                assert_eq!(existing.message_id, posted.message.message_id);
                assert_eq!(existing.reply.unwrap().run_id, "run-1");
            }
            other => panic!("expected Duplicate, got {other:?}"),
        }
        assert_eq!(store.list_threads("alice").await.unwrap().len(), 1);

        // A second connect finds the schema in place (migrations are recorded) and the data.
        store.close().await;
        let again = connect_pg(&pg.default_url()).await;
        assert_eq!(
            again
                .get_thread("alice", &posted.thread_id)
                .await
                .unwrap()
                .len(),
            7
        );
    }

    #[tokio::test]
    async fn replicas_starting_together_on_an_empty_database_all_migrate_it() {
        let pg = postgres();
        let url = pg.create_database("fresh").unwrap();
        let connects: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { connect_pg(&url).await })
            })
            .collect();
        let mut versions = Vec::new();
        for connect in connects {
            versions.push(connect.await.unwrap().schema_version());
        }
        let newest = versions[0];
        assert!(newest >= 2, "{versions:?}");
        assert!(versions.iter().all(|v| *v == newest), "{versions:?}");
        let applied = pg
            .psql(
                "fresh",
                "SELECT count(*) FROM _sqlx_migrations WHERE success",
            )
            .unwrap();
        assert_eq!(applied, newest.to_string(), "each migration applied once");
    }

    #[tokio::test]
    async fn a_database_migrated_by_a_newer_version_still_opens() {
        let pg = postgres();
        let url = pg.create_database("ahead").unwrap();
        connect_pg(&url).await.close().await;
        // A newer pod applied a migration this binary does not know.
        pg.psql(
            "ahead",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from a newer version', true, '\\x00', 1)",
        )
        .unwrap();
        let store = connect_pg(&url).await;
        assert_eq!(store.schema_version(), 9999);
        store.create_thread("alice", "still works").await.unwrap();
    }

    #[tokio::test]
    async fn postgres_pages_big_threads_and_long_lists() {
        let pg = postgres();
        let store = connect_pg(&pg.default_url()).await;
        pages_cover_a_big_thread(&store).await;
        pages_cover_many_threads(&store).await;
    }
}
