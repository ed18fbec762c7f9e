//! The OpenAPI 3.1 description served at `GET /openapi.json`. The paths come from the
//! route table (`api::ROUTES`): each operation there names its summary and one of the
//! functions here for its parameters and responses; this module adds the schemas.

use serde_json::{Value, json};

use crate::protocol::{CLIENT_NAME_HEADER, SESSION_HEADER};

fn detail(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Detail"}}}
    })
}

fn validation() -> Value {
    json!({
        "description": "Validation error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationError"}}}
    })
}

fn body(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn session_header() -> Value {
    json!({"name": SESSION_HEADER, "in": "header", "required": true, "schema": {"type": "string"}})
}

/// The gate's answers, shared by every `/lab*` operation.
fn gated(mut responses: Value) -> Value {
    responses["404"] = detail("Session not found (or, where noted, no lab running)");
    responses["422"] = validation();
    responses["423"] = detail("Session is not active");
    responses
}

fn session_id_param() -> Value {
    json!({"name": "session_id", "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The whole document, from `(path, method, summary, operation)` of every operation.
pub fn document<'a>(operations: impl Iterator<Item = (&'a str, &'a str, &'a str, Value)>) -> Value {
    let mut paths = serde_json::Map::new();
    for (path, method, summary, mut operation) in operations {
        operation["summary"] = summary.into();
        let item = paths.entry(path).or_insert_with(|| json!({}));
        item[method] = operation;
    }
    let mut schemas = core_schemas();
    if let (Some(map), Value::Object(extra)) = (schemas.as_object_mut(), observe_schemas()) {
        map.extend(extra);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "neops-remote-lab",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Exclusive, queued access to this host's network lab."
        },
        "paths": paths,
        "components": {"schemas": schemas}
    })
}

// ------------------------------------------------------------------------------- operations

pub fn create_session() -> Value {
    json!({
        "parameters": [{"name": CLIENT_NAME_HEADER, "in": "header", "required": false,
            "description": "Who is asking (a CI job URL, a host name, a person): at most 200 printable characters; characters beyond ASCII percent-encoded as UTF-8. Shown in the queue view, the events and the status page.",
            "schema": {"type": "string", "maxLength": 200}},
            {"name": "X-Topology-SHA256", "in": "header", "required": false,
            "description": "The SHA-256 of the topology file the session will upload (64 hexadecimal digits). When a lab with that hash is idle as a session becomes active, a session that declared it may be promoted ahead of up to --affinity-window others, each passed over at most --max-skips times. Nothing is enforced: the session may upload anything.",
            "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}],
        "responses": {
            "201": body("Session created", "SessionCreated"),
            "422": validation(),
            "503": detail("Session queue is full, or the host is draining (see Retry-After)")
        }
    })
}

pub fn heartbeat() -> Value {
    json!({
        "parameters": [session_header()],
        "responses": {
            "204": {"description": "Seen"},
            "404": detail("Session not found"),
            "422": validation()
        }
    })
}

pub fn session_status() -> Value {
    json!({
        "description": "With `wait=S` (0 < S <= 60) a WAITING session's request is answered when its status or position changes, or after S seconds with the current state (long-poll).",
        "parameters": [session_id_param(), {"name": "wait", "in": "query", "required": false, "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 60}}],
        "responses": {
            "200": body("Status", "SessionStatus"),
            "404": detail("Session not found"),
            "422": {"description": "Bad wait", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationError"}}}}
        }
    })
}

pub fn end_session() -> Value {
    json!({
        "parameters": [session_id_param()],
        "responses": {
            "204": {"description": "Ended"},
            "404": detail("Session not found")
        }
    })
}

pub fn active_session() -> Value {
    json!({
        "responses": {
            "200": body("The active session", "ActiveSession"),
            "404": detail("No active session")
        }
    })
}

pub fn acquire() -> Value {
    json!({
        "parameters": [session_header()],
        "requestBody": {
            "required": true,
            "content": {"multipart/form-data": {"schema": {
                "type": "object",
                "required": ["topology"],
                "properties": {
                    "topology": {"type": "string", "contentMediaType": "application/octet-stream"},
                    "reuse": {"type": "boolean", "default": true},
                    "extra_files": {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}
                }
            }}}
        },
        "responses": gated(json!({
            "200": body("The lab's devices", "Acquired"),
            "400": detail("Bad file name or multipart body"),
            "409": detail("Another netlab instance runs on the host"),
            "413": detail("Upload too large or too many parts"),
            "500": detail("netlab failed"),
            "503": detail("Server is shutting down, or the lab host is unhealthy (answered before the body is read)"),
            "504": detail("netlab up timed out")
        }))
    })
}

pub fn lab_status() -> Value {
    json!({
        "parameters": [session_header()],
        "responses": gated(json!({"200": body("Lab state", "LabStatus")}))
    })
}

pub fn destroy_lab() -> Value {
    json!({
        "parameters": [session_header(), {"name": "force", "in": "query", "required": false, "schema": {"type": "boolean", "default": true}}],
        "responses": gated(json!({
            "202": {"description": "Teardown queued"},
            "204": {"description": "No lab running"},
            "409": detail("Lab still in use")
        }))
    })
}

pub fn release_lab() -> Value {
    json!({
        "parameters": [session_header()],
        "responses": gated(json!({"204": {"description": "Released"}}))
    })
}

pub fn lab_devices() -> Value {
    json!({
        "parameters": [session_header()],
        "responses": gated(json!({"200": {"description": "Devices", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}}}}}))
    })
}

pub fn healthz() -> Value {
    json!({"responses": {"204": {"description": "Alive, taking sessions and starting labs"}, "503": detail("degraded: the state file cannot be written; draining: no new sessions; unhealthy: starts keep failing (netlab's last error follows)")}})
}

/// The answers of an admin action.
fn admin(done: &str) -> Value {
    json!({
        "responses": {
            "204": {"description": done},
            "401": detail("Not authenticated"),
            "403": detail("Not an admin token"),
            "503": detail("The change could not be written to the state dir")
        }
    })
}

pub fn admin_drain() -> Value {
    admin(
        "Draining: POST /session gets 503 until resumed, the sessions there finish; kept across restarts",
    )
}

pub fn admin_resume() -> Value {
    admin("Taking new sessions again")
}

pub fn admin_health_reset() -> Value {
    admin("Healthy: no failed starts counted, POST /lab served again")
}

pub fn favicon() -> Value {
    json!({"responses": {"204": {"description": "No icon; never needs a token"}}})
}

pub fn debug_health() -> Value {
    json!({"responses": {"200": body("Figures", "Health")}})
}

pub fn openapi() -> Value {
    json!({"responses": {"200": {"description": "OpenAPI 3.1 document"}}})
}

pub fn queue() -> Value {
    json!({
        "parameters": [{"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 1_000_000, "default": 1000}}],
        "responses": {"200": body("The queue view", "QueueView"), "422": validation()}
    })
}

pub fn events() -> Value {
    json!({
        "parameters": [
            {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100}},
            {"name": "since", "in": "query", "required": false, "description": "Only events with a greater id", "schema": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_992_u64, "default": 0}}
        ],
        "responses": {"200": body("Events", "Events"), "422": validation()}
    })
}

pub fn lab_log() -> Value {
    json!({
        "parameters": [
            {"name": "offset", "in": "query", "required": false, "description": "Byte offset to continue from (the X-Log-Offset of the previous answer)", "schema": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_992_u64, "default": 0}},
            {"name": "command", "in": "query", "required": false, "description": "The last start (up) or teardown (down) instead of the latest job", "schema": {"enum": ["up", "down"]}}
        ],
        "responses": {
            "200": {
                "description": "The output after offset",
                "headers": {
                    "X-Log-Offset": {"description": "Where to continue", "schema": {"type": "integer"}},
                    "X-Log-Command": {"description": "up, down, or none", "schema": {"type": "string"}},
                    "X-Log-Done": {"description": "true once the command ended", "schema": {"type": "boolean"}}
                },
                "content": {"text/plain": {"schema": {"type": "string"}}}
            },
            "422": validation()
        }
    })
}

pub fn metrics() -> Value {
    json!({"responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}})
}

pub fn status_page() -> Value {
    json!({"responses": {"200": {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}}})
}

// ------------------------------------------------------------------------------- schemas

fn core_schemas() -> Value {
    json!({
        "Detail": {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}},
        "ValidationError": {"type": "object", "properties": {"detail": {"type": "array", "items": {
            "type": "object",
            "properties": {"type": {"type": "string"}, "loc": {"type": "array", "items": {"type": "string"}}, "msg": {"type": "string"}, "input": {}}
        }}}},
        "SessionCreated": {"type": "object", "required": ["session_id", "position"], "properties": {"session_id": {"type": "string"}, "position": {"type": "integer"}}},
        "SessionStatus": {"type": "object", "required": ["status", "position"], "properties": {"status": {"enum": ["active", "waiting"]}, "position": {"type": "integer"}}},
        "ActiveSession": {"type": "object", "properties": {"status": {"const": "active"}, "position": {"const": 0}, "session_id": {"type": "string"}}},
        "Device": {"type": "object", "required": ["name", "raw"], "properties": {"name": {"type": "string"}, "raw": {"type": "object"}}},
        "Acquired": {"type": "object", "required": ["reused", "devices"], "properties": {"reused": {"type": "boolean"}, "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}}},
        "LabStatus": {"type": "object", "properties": {
            "running": {"type": "boolean"},
            "topology": {"type": ["string", "null"], "description": "The uploaded topology file's name (not its path on the server)."},
            "ref_count": {"type": "integer"},
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "netlab_status": {"type": "null", "description": "Always null. Kept for compatibility with the Python server's clients, which read the key; that server never filled it either. Ask netlab itself for its view: `netlab status --all` (see the operator guide)."}
        }},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string"}, "timestamp": {"type": "number"}, "uptime": {"type": "number"},
            "sessions": {"type": "integer"}, "queue_length": {"type": "integer"},
            "teardowns": {"type": "array", "description": "Teardowns not done yet: queued (attempts 0), or failed and retried with back-off (error: netlab's words; retry_in: seconds to the next attempt). The lab's work directory is kept until netlab succeeds.", "items": {"type": "object", "properties": {
                "work_dir": {"type": "string"}, "attempts": {"type": "integer"},
                "error": {"type": ["string", "null"]}, "retry_in": {"type": ["number", "null"]}
            }}},
            "active_timeout": {"type": "number"}, "waiting_timeout": {"type": "number"},
            "long_polls": {"type": "integer"},
            "long_poll_cap": {"type": "integer", "description": "At most this many long-polls are parked (a quarter of the open-files limit less 256, at most 10 000); beyond, `wait` is ignored."}
        }}
    })
}

fn observe_schemas() -> Value {
    json!({
            "QueueView": {"type": "object", "required": ["time", "version", "active_timeout", "waiting_timeout", "host_state", "host_state_reason", "lab", "operation", "teardowns_pending", "total", "truncated", "sessions"], "properties": {
                "time": {"type": "number", "description": "Server time, unix seconds"},
                "version": {"type": "string"},
                "active_timeout": {"type": "number", "description": "Seconds of silence after which the ACTIVE session is reaped"},
                "waiting_timeout": {"type": "number", "description": "Seconds of silence after which a WAITING session is reaped"},
                "host_state": {"enum": ["ok", "draining", "unhealthy"], "description": "draining: no new sessions (an admin's drain); unhealthy: POST /lab refused (starts kept failing for reasons not the topology's)"},
                "host_state_reason": {"type": ["string", "null"], "description": "Who drained the host, or netlab's last error"},
                "lab": {"type": "object", "properties": {
                    "running": {"type": "boolean"},
                    "topology": {"type": ["string", "null"], "description": "File name of the topology"},
                    "hash": {"type": ["string", "null"], "description": "First 12 hex digits of the topology's SHA-256"},
                    "devices": {"type": "integer"},
                    "device_names": {"type": "array", "items": {"type": "string"}},
                    "device_list": {"type": "array", "description": "Each device's management address and type, from netlab's data", "items": {"type": "object", "required": ["name", "mgmt", "type", "box"], "properties": {
                        "name": {"type": "string"},
                        "mgmt": {"type": ["string", "null"], "description": "mgmt.ipv4, else mgmt.ipv6, else ansible_host"},
                        "type": {"type": ["string", "null"], "description": "netlab's device type (device, else ansible_network_os)"},
                        "box": {"type": ["string", "null"], "description": "The image or box"}
                    }}},
                    "started_at": {"type": ["number", "null"]},
                    "ref_count": {"type": "integer"},
                    "idle_since": {"type": ["number", "null"], "description": "Since when the lab is unreferenced with no session (idle-lab-timeout counts from here)"}
                }},
                "operation": {"type": ["object", "null"], "description": "A start (up), teardown (down) or upload in progress", "properties": {
                    "command": {"enum": ["up", "down", "upload"]}, "since": {"type": "number"}, "session": {"type": ["string", "null"]}
                }},
                "teardowns_pending": {"type": "integer"},
                "total": {"type": "integer", "description": "Sessions in the queue"},
                "truncated": {"type": "boolean", "description": "The list was cut at limit"},
                "sessions": {"type": "array", "items": {"type": "object", "properties": {
                    "position": {"type": "integer"},
                    "status": {"enum": ["active", "waiting"]},
                    "id": {"type": "string", "description": "The first 8 characters of the session id"},
                    "client_name": {"type": ["string", "null"]},
                    "owner": {"type": ["string", "null"]},
                    "address": {"type": ["string", "null"]},
                    "user_agent": {"type": ["string", "null"]},
                    "created_at": {"type": "number"},
                    "active_since": {"type": ["number", "null"]},
                    "last_seen_ago": {"type": "number", "description": "Seconds since the session was last seen"},
                    "holds_lab": {"type": "boolean", "description": "Holds references on the running lab"},
                    "acquiring": {"type": "boolean", "description": "Its POST /lab is in progress"},
                    "declared": {"type": ["string", "null"], "description": "The first 12 hex digits of the topology hash it declared (X-Topology-SHA256)"},
                    "skips": {"type": "integer", "description": "How often a promotion ahead passed it over (at most --max-skips)"},
                    "promoted_ahead": {"type": "boolean", "description": "It went ahead of others because it declared the idle lab"}
                }}}
            }},
            "Events": {"type": "object", "required": ["last_id", "events"], "properties": {
                "last_id": {"type": "integer"},
                "events": {"type": "array", "items": {"type": "object", "required": ["id", "time", "kind"], "properties": {
                    "id": {"type": "integer"}, "time": {"type": "number"},
                    "kind": {"enum": ["server_started", "server_stopping", "session_created", "session_promoted", "session_ended", "lab_start_begun", "lab_started", "lab_reused", "lab_start_failed", "lab_released", "teardown_begun", "teardown_done", "lab_idle_teardown", "promoted_ahead", "host_draining", "host_resumed", "host_unhealthy", "host_healthy", "health_check"]},
                    "session": {"type": ["string", "null"]}, "client": {"type": ["string", "null"]}
                }}}
            }}
    })
}
