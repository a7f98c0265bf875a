//! A stateful stand-in for the Kubernetes API server, behind kube-rs' tower-test mock
//! service: it keeps objects as JSON (with uid, resourceVersion, generation), answers
//! gets, lists, server-side-apply patches (spec and status), deletes with uid
//! preconditions and event creation, and records every mutating request so tests can
//! assert the exact requests the operator made. No real API server can run here.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

/// One mutating request, as the operator sent it.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Mutation {
    /// "PATCH statefulsets/chat" style summary: method, resource and name (and
    /// `/status` for status patches).
    pub fn summary(&self) -> String {
        let parts: Vec<&str> = self.path.split('/').collect();
        let ns = parts.iter().position(|p| *p == "namespaces");
        let tail = match ns {
            Some(i) => parts[i + 2..].join("/"),
            None => parts
                .iter()
                .rev()
                .take(2)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("/"),
        };
        format!("{} {tail}", self.method)
    }
}

#[derive(Default)]
pub struct Store {
    /// Collection path ("/api/v1/namespaces/ns/pods") -> name -> object.
    pub objects: BTreeMap<String, BTreeMap<String, Value>>,
    pub mutations: Vec<Mutation>,
    next_uid: u64,
    next_rv: u64,
    /// Fail the n-th mutating request from now with a 500 (a crash between side effects).
    pub fail_mutation_in: Option<usize>,
}

impl Store {
    pub fn uid(&mut self) -> String {
        self.next_uid += 1;
        format!("uid-{}", self.next_uid)
    }

    fn rv(&mut self) -> String {
        self.next_rv += 1;
        self.next_rv.to_string()
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<&Value> {
        self.objects.get(collection).and_then(|c| c.get(name))
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.objects
            .get(collection)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Inserts or replaces an object, filling uid, resourceVersion and generation.
    pub fn put(&mut self, collection: &str, name: &str, mut obj: Value) {
        let rv = self.rv();
        let existing_uid = self
            .get(collection, name)
            .and_then(|o| o["metadata"]["uid"].as_str().map(String::from));
        let uid = match existing_uid {
            Some(u) => u,
            None => obj["metadata"]["uid"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| self.uid()),
        };
        obj["metadata"]["uid"] = json!(uid);
        obj["metadata"]["name"] = json!(name);
        obj["metadata"]["resourceVersion"] = json!(rv);
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        self.objects
            .entry(collection.to_string())
            .or_default()
            .insert(name.to_string(), obj);
    }

    pub fn remove(&mut self, collection: &str, name: &str) -> Option<Value> {
        self.objects.get_mut(collection)?.remove(name)
    }

    /// Mutations whose summary starts with `prefix`.
    pub fn mutations_like(&self, prefix: &str) -> Vec<Mutation> {
        self.mutations
            .iter()
            .filter(|m| m.summary().starts_with(prefix))
            .cloned()
            .collect()
    }
}

pub type SharedStore = Arc<Mutex<Store>>;

/// The stored object `name` of `collection`, typed; panics (in a test) when it is missing
/// or does not parse.
pub fn object<T: serde::de::DeserializeOwned>(
    store: &SharedStore,
    collection: &str,
    name: &str,
) -> T {
    let v = store
        .lock()
        .expect("lock")
        .get(collection, name)
        .cloned()
        .unwrap_or_else(|| panic!("{collection}/{name} exists"));
    serde_json::from_value(v).unwrap_or_else(|e| panic!("{collection}/{name} parses: {e}"))
}

/// Collections whose last path segment is a name, by their plural.
const PLURALS: [&str; 11] = [
    "parleyclusters",
    "statefulsets",
    "pods",
    "persistentvolumeclaims",
    "services",
    "configmaps",
    "poddisruptionbudgets",
    "events",
    "nodes",
    "persistentvolumes",
    "leases",
];

/// Splits a path into (collection, name, subresource).
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let Some(i) = parts.iter().rposition(|p| PLURALS.contains(p)) else {
        return (path.to_string(), None, None);
    };
    let collection = parts[..=i].join("/");
    let name = parts.get(i + 1).map(|s| s.to_string());
    let sub = parts.get(i + 2).map(|s| s.to_string());
    (collection, name, sub)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// Deep-merges `patch` into `base` (objects merge, everything else replaces).
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Handles one request against the store.
pub fn answer(store: &SharedStore, req: Request<Vec<u8>>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body: Value = if req.body().is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(req.body())
            .or_else(|_| serde_yaml::from_slice(req.body()))
            .unwrap_or(Value::Null)
    };
    let (collection, name, sub) = split(&path);
    let mut s = store.lock().expect("store lock");
    if method != "GET" {
        s.mutations.push(Mutation {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: body.clone(),
        });
        if let Some(n) = s.fail_mutation_in.as_mut() {
            if *n == 0 {
                s.fail_mutation_in = None;
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &status(500, "InternalError", "injected failure"),
                );
            }
            *n -= 1;
        }
    }
    match (method.as_str(), name) {
        ("GET", None) => {
            let items = s.list(&collection);
            respond(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        ("GET", Some(name)) => match s.get(&collection, &name) {
            Some(o) => respond(StatusCode::OK, o),
            None => respond(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("{name} not found")),
            ),
        },
        ("PATCH", Some(name)) => {
            let mut obj = s
                .get(&collection, &name)
                .cloned()
                .unwrap_or_else(|| json!({"metadata": {}}));
            if sub.as_deref() == Some("status") {
                if obj["metadata"]["uid"].is_null() {
                    return respond(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", &format!("{name} not found")),
                    );
                }
                // Server-side apply of the whole status: fields not sent are dropped.
                obj["status"] = body["status"].clone();
            } else {
                let old_spec = obj["spec"].clone();
                if content_type.contains("json-patch") {
                    if let Some(ops) = body.as_array() {
                        for op in ops {
                            if op["op"] == "add" || op["op"] == "replace" {
                                let ptr = op["path"].as_str().unwrap_or("");
                                if ptr == "/metadata/finalizers" {
                                    obj["metadata"]["finalizers"] = op["value"].clone();
                                }
                            }
                        }
                    }
                } else {
                    let mut patch = body.clone();
                    if let Some(m) = patch.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                        m.remove("uid");
                        m.remove("resourceVersion");
                    }
                    // Apply replaces lists and owned maps; a plain deep merge of the
                    // applied fields is what these tests need.
                    if let Some(spec) = patch.get("spec").cloned() {
                        obj["spec"] = spec;
                        patch.as_object_mut().map(|p| p.remove("spec"));
                    }
                    if let Some(data) = patch.get("data").cloned() {
                        obj["data"] = data;
                        patch.as_object_mut().map(|p| p.remove("data"));
                    }
                    merge(&mut obj, &patch);
                }
                if obj["spec"] != old_spec {
                    let g = obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    obj["metadata"]["generation"] = json!(g);
                }
            }
            s.put(&collection, &name, obj);
            let out = s.get(&collection, &name).cloned().unwrap_or(Value::Null);
            respond(StatusCode::OK, &out)
        }
        ("DELETE", Some(name)) => {
            let Some(existing) = s.get(&collection, &name).cloned() else {
                return respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("{name} not found")),
                );
            };
            if let Some(uid) = body["preconditions"]["uid"].as_str() {
                if existing["metadata"]["uid"].as_str() != Some(uid) {
                    return respond(
                        StatusCode::CONFLICT,
                        &status(409, "Conflict", "precondition failed: uid"),
                    );
                }
            }
            s.remove(&collection, &name);
            respond(StatusCode::OK, &existing)
        }
        ("PUT", Some(name)) => {
            // Replace with optimistic concurrency: the resourceVersion sent must be the
            // stored one, as on a real API server.
            let Some(existing) = s.get(&collection, &name).cloned() else {
                return respond(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("{name} not found")),
                );
            };
            let sent = body["metadata"]["resourceVersion"].as_str();
            if sent.is_some() && sent != existing["metadata"]["resourceVersion"].as_str() {
                return respond(
                    StatusCode::CONFLICT,
                    &status(
                        409,
                        "Conflict",
                        "the object has been modified; apply your changes to the latest version",
                    ),
                );
            }
            s.put(&collection, &name, body.clone());
            let out = s.get(&collection, &name).cloned().unwrap_or(Value::Null);
            respond(StatusCode::OK, &out)
        }
        ("POST", None) => {
            let name = body["metadata"]["name"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| s.uid());
            if s.get(&collection, &name).is_some() {
                return respond(
                    StatusCode::CONFLICT,
                    &status(409, "AlreadyExists", &format!("{name} already exists")),
                );
            }
            s.put(&collection, &name, body.clone());
            let out = s.get(&collection, &name).cloned().unwrap_or(Value::Null);
            respond(StatusCode::CREATED, &out)
        }
        _ => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", &format!("{method} {path}")),
        ),
    }
}

/// A kube Client whose requests are answered from `store` by a background task.
pub fn client(store: SharedStore) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body
                .collect_bytes()
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            let response = answer(&store, Request::from_parts(parts, bytes));
            send.send_response(response);
        }
    });
    kube::Client::new(service, "default")
}
