use serde_json::{Value, json};

use super::*;

/// The message Celery 5.6 published for `add.apply_async((2, 2), priority=3)` (§2.5).
fn captured() -> Envelope {
    let headers = json!({"lang": "py", "task": "proj.tasks.add", "id": "11111111-2222-4333-8444-555555555555",
       "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0,
       "timelimit": [null, null], "root_id": "11111111-2222-4333-8444-555555555555", "parent_id": null,
       "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen16992@host", "ignore_result": false,
       "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}});
    Envelope {
        headers: headers.as_object().unwrap().clone(),
        properties: Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            correlation_id: Some("11111111-2222-4333-8444-555555555555".into()),
            reply_to: Some("c64b5191-3499-38c3-8569-53dbe3895d9b".into()),
            priority: Some(3),
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body:
            br#"[[2, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
                .to_vec(),
    }
}

#[test]
fn decodes_the_captured_celery_message() {
    let message = TaskMessage::decode(&captured()).unwrap();
    assert_eq!(message.task, "proj.tasks.add");
    assert_eq!(message.id, "11111111-2222-4333-8444-555555555555");
    assert_eq!(message.args, [json!(2), json!(2)]);
    assert!(message.kwargs.is_empty());
    assert_eq!(message.embed, Embed::default());
    assert_eq!(message.retries, 0);
    assert_eq!(
        message.root_id.as_deref(),
        Some("11111111-2222-4333-8444-555555555555")
    );
    assert_eq!(message.priority, Some(3));
    assert_eq!(
        message.reply_to.as_deref(),
        Some("c64b5191-3499-38c3-8569-53dbe3895d9b")
    );
    assert_eq!(message.origin.as_deref(), Some("gen16992@host"));
    assert_eq!(
        message.extra_headers.keys().collect::<Vec<_>>(),
        ["replaced_task_nesting", "stamped_headers", "stamps"]
    );
    assert!(
        message.custom_headers().is_empty(),
        "Celery's own headers are no custom headers"
    );
    assert_eq!(
        message.ignore_result,
        Some(false),
        "an explicit false is kept"
    );
}

/// Celery's `task_compression = "gzip"`: the body zlib-compressed, the codec named in the
/// `compression` header; it decodes as the plain message does.
#[test]
fn a_compressed_celery_message_decodes_as_the_plain_one() {
    let plain = captured();
    let mut compressed = captured();
    compressed.body = compression::zlib(&plain.body);
    compressed
        .headers
        .insert("compression".into(), json!(compression::ZLIB));
    let decoded = TaskMessage::decode(&compressed).unwrap();
    assert_eq!(decoded.args, [json!(2), json!(2)]);
    assert_eq!(decoded.id, TaskMessage::decode(&plain).unwrap().id);
    assert!(
        !decoded.extra_headers.contains_key("compression"),
        "the codec is no custom header"
    );
}

/// Celery's `request.headers`: what a sender added with `apply_async(headers=…)`, without
/// Celery's protocol headers and wasmq's bookkeeping; kept through encoding (a retry).
#[test]
fn custom_headers_are_the_senders_own() {
    let mut envelope = captured();
    for (name, value) in [
        ("x-test-header", json!("test-value")),
        ("x-wasmq-deliveries", json!(2)),
        ("x-delivery-count", json!(1)),
    ] {
        envelope.headers.insert(name.into(), value);
    }
    let message = TaskMessage::decode(&envelope).unwrap();
    assert_eq!(
        Value::Object(message.custom_headers()),
        json!({"x-test-header": "test-value", "x-delivery-count": 1})
    );
    let again = TaskMessage::decode(&message.encode()).unwrap();
    assert_eq!(again.custom_headers(), message.custom_headers());

    let options = SendOptions {
        headers: json!({"x-test-header": "v", "task": "not.this"})
            .as_object()
            .unwrap()
            .clone(),
        ..SendOptions::default()
    };
    let built = TaskMessage::build("math.add", vec![], Map::new(), &options);
    assert_eq!(
        Value::Object(built.custom_headers()),
        json!({"x-test-header": "v"})
    );
    let envelope = built.encode();
    assert_eq!(
        envelope.headers["task"],
        json!("math.add"),
        "Celery's own header wins"
    );
    assert_eq!(
        envelope.headers["ignore_result"],
        Value::Null,
        "not said: the worker follows the task's declaration"
    );
    assert_eq!(TaskMessage::decode(&envelope).unwrap().ignore_result, None);
}

#[test]
fn encode_emits_the_full_v2_header_set_and_round_trips() {
    let mut message = TaskMessage::new("math.add", vec![json!(2), json!(3)], Map::new());
    message.eta = parse_time("2026-11-28T18:56:05.710508+00:00");
    message.time_limit = Some(30.0);
    message.soft_time_limit = Some(20.0);
    message.extra_headers.insert("x-custom".into(), "v".into());
    let envelope = message.encode();
    let captured = captured();
    for key in captured.headers.keys() {
        assert!(envelope.headers.contains_key(key), "missing header {key}");
    }
    assert_eq!(
        envelope.headers["eta"],
        json!("2026-11-28T18:56:05.710508+00:00")
    );
    assert_eq!(envelope.headers["timelimit"], json!([30.0, 20.0]));
    assert_eq!(envelope.headers["argsrepr"], json!("(2, 3)"));
    assert_eq!(envelope.headers["x-custom"], json!("v"));
    assert_eq!(
        envelope.properties.correlation_id.as_deref(),
        Some(message.id.as_str())
    );
    assert_eq!(envelope.properties.delivery_mode, Some(2));
    let body: Value = serde_json::from_slice(&envelope.body).unwrap();
    assert_eq!(
        body,
        json!([[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
    );
    let decoded = TaskMessage::decode(&envelope).unwrap();
    assert_eq!(
        (decoded.task.as_str(), decoded.id.as_str()),
        ("math.add", message.id.as_str())
    );
    assert_eq!(
        (decoded.args, decoded.eta, decoded.time_limit),
        (message.args.clone(), message.eta, Some(30.0))
    );
    // Decoding then encoding again reproduces the same message exactly.
    assert_eq!(TaskMessage::decode(&envelope).unwrap().encode(), envelope);
}

#[test]
fn minimal_python_messages_decode() {
    // §2.6: what the Python worker accepts, wasmq accepts too.
    for body in [
        &br#"[[2,3],{},{}]"#[..],
        br#"[[2,4],{},null]"#,
        br#"[[],{"x":1,"y":5},{}]"#,
    ] {
        let envelope = Envelope {
            headers: json!({"task": "t", "id": "i"}).as_object().unwrap().clone(),
            properties: Properties::default(),
            body: body.to_vec(),
        };
        TaskMessage::decode(&envelope).unwrap();
    }
}

#[test]
fn every_malformed_class_is_a_typed_error_with_the_task_id() {
    let with = |headers: Value, body: &[u8], content_type: Option<&str>| Envelope {
        headers: headers.as_object().unwrap().clone(),
        properties: Properties {
            content_type: content_type.map(str::to_owned),
            ..Properties::default()
        },
        body: body.to_vec(),
    };
    let ok_headers = json!({"task": "math.add", "id": "T1"});
    let cases: Vec<(Envelope, &str)> = vec![
        (
            with(ok_headers.clone(), b"not json", None),
            "the body is not JSON",
        ),
        (
            with(ok_headers.clone(), b"[[2, 5], {}]", None),
            "got 2 elements",
        ),
        (
            with(ok_headers.clone(), b"{\"args\": []}", None),
            "got an object",
        ),
        (
            with(ok_headers.clone(), b"[5, {}, {}]", None),
            "args must be an array, got a number",
        ),
        (
            with(ok_headers.clone(), b"[[], [], {}]", None),
            "kwargs must be an object, got an array",
        ),
        (
            with(ok_headers.clone(), b"[[], {}, 7]", None),
            "embed must be an object or null",
        ),
        (
            with(
                ok_headers.clone(),
                b"[[], {}, {}]",
                Some("application/x-python-serialize"),
            ),
            "unsupported content type",
        ),
        (
            with(
                json!({"task": "math.add", "id": "T1", "compression": "application/x-bz2"}),
                b"x",
                None,
            ),
            "unsupported compression",
        ),
        (
            with(
                json!({"task": "math.add", "id": "T1", "compression": "application/x-gzip"}),
                b"x",
                None,
            ),
            "the compressed body cannot be read",
        ),
        (
            with(
                json!({"task": "math.add", "id": "T1", "retries": "one"}),
                b"[[], {}, {}]",
                None,
            ),
            "header \"retries\" must be a non-negative integer, got a string",
        ),
        (
            with(
                json!({"task": "math.add", "id": "T1", "eta": "tomorrow"}),
                b"[[], {}, {}]",
                None,
            ),
            "header \"eta\" is not an ISO-8601 time",
        ),
        (
            with(
                json!({"task": "math.add", "id": "T1", "timelimit": [-1, null]}),
                b"[[], {}, {}]",
                None,
            ),
            "header \"timelimit\"",
        ),
    ];
    for (envelope, expected) in cases {
        let error = TaskMessage::decode(&envelope).unwrap_err();
        assert_eq!(error.task_id.as_deref(), Some("T1"), "{expected}");
        assert_eq!(error.task.as_deref(), Some("math.add"), "{expected}");
        assert!(
            error.to_string().contains(expected),
            "{error} !~ {expected}"
        );
    }
    // Without a task id, the error says so and carries none.
    let error =
        TaskMessage::decode(&with(json!({"task": "math.add"}), b"[[], {}, {}]", None)).unwrap_err();
    assert_eq!(error.task_id, None);
    assert_eq!(error.kind, DecodeErrorKind::MissingHeader("id"));
    let error = TaskMessage::decode(&with(json!({"id": "T2"}), b"[[], {}, {}]", None)).unwrap_err();
    assert_eq!(error.task_id.as_deref(), Some("T2"));
    assert_eq!(error.kind, DecodeErrorKind::MissingHeader("task"));
}

#[test]
fn times_parse_with_and_without_offsets() {
    let aware = parse_time("2026-11-28T18:56:05.710508+00:00").unwrap();
    let naive = parse_time("2026-11-28T18:56:05.710508").unwrap();
    assert_eq!(aware, naive);
    let shifted = parse_time("2026-11-28T19:56:05.710508+01:00").unwrap();
    assert_eq!(aware, shifted);
    assert_eq!(format_time(&aware), "2026-11-28T18:56:05.710508+00:00");
}
