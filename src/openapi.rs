//! `GET /openapi.json`: an OpenAPI 3.1 description of every route. A test checks that it
//! names exactly the routes and methods the router serves.

use std::sync::OnceLock;

use serde_json::{Value, json};

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
    json!({"name": "X-Session-ID", "in": "header", "required": true, "schema": {"type": "string"}})
}

/// The gate's answers, shared by every `/lab*` operation.
fn gated(mut responses: Value) -> Value {
    responses["404"] = detail("Session not found (or, where noted, no lab running)");
    responses["422"] = validation();
    responses["423"] = detail("Session is not active");
    responses
}

fn build() -> Value {
    let session_id_param =
        json!({"name": "session_id", "in": "path", "required": true, "schema": {"type": "string"}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "neops-remote-lab",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Exclusive, queued access to this host's network lab."
        },
        "paths": {
            "/session": {
                "post": {
                    "summary": "Open a session and join the queue",
                    "responses": {
                        "201": body("Session created", "SessionCreated"),
                        "503": detail("Session queue is full (see Retry-After)")
                    }
                }
            },
            "/session/heartbeat": {
                "post": {
                    "summary": "Keep a session alive",
                    "parameters": [session_header()],
                    "responses": {
                        "204": {"description": "Seen"},
                        "404": detail("Session not found"),
                        "422": validation()
                    }
                }
            },
            "/session/{session_id}": {
                "get": {
                    "summary": "Status and queue position of a session",
                    "description": "With `wait=S` (0 < S <= 60) a WAITING session's request is answered when its status or position changes, or after S seconds with the current state (long-poll).",
                    "parameters": [session_id_param.clone(), {"name": "wait", "in": "query", "required": false, "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 60}}],
                    "responses": {
                        "200": body("Status", "SessionStatus"),
                        "404": detail("Session not found"),
                        "422": {"description": "Bad wait", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ValidationError"}}}}
                    }
                },
                "delete": {
                    "summary": "End a session",
                    "parameters": [session_id_param],
                    "responses": {
                        "204": {"description": "Ended"},
                        "404": detail("Session not found")
                    }
                }
            },
            "/active-session": {
                "get": {
                    "summary": "The active session (a read: it does not keep that session alive)",
                    "responses": {
                        "200": body("The active session", "ActiveSession"),
                        "404": detail("No active session")
                    }
                }
            },
            "/lab": {
                "post": {
                    "summary": "Upload a topology and acquire the lab",
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
                        "503": detail("Server is shutting down"),
                        "504": detail("netlab up timed out")
                    }))
                },
                "get": {
                    "summary": "The lab's state (a read: it does not keep the session alive)",
                    "parameters": [session_header()],
                    "responses": gated(json!({"200": body("Lab state", "LabStatus")}))
                },
                "delete": {
                    "summary": "Tear the lab down",
                    "parameters": [session_header(), {"name": "force", "in": "query", "required": false, "schema": {"type": "boolean", "default": true}}],
                    "responses": gated(json!({
                        "202": {"description": "Teardown queued"},
                        "204": {"description": "No lab running"},
                        "409": detail("Lab still in use")
                    }))
                }
            },
            "/lab/release": {
                "post": {
                    "summary": "Release one reference on the lab",
                    "parameters": [session_header()],
                    "responses": gated(json!({"204": {"description": "Released"}}))
                }
            },
            "/lab/devices": {
                "get": {
                    "summary": "The running lab's devices (a read: it does not keep the session alive)",
                    "parameters": [session_header()],
                    "responses": gated(json!({"200": {"description": "Devices", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}}}}}))
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"204": {"description": "Alive"}}}
            },
            "/debug/health": {
                "get": {"summary": "Health and queue figures", "responses": {"200": body("Figures", "Health")}}
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1 document"}}}
            }
        },
        "components": {"schemas": {
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
                "topology": {"type": ["string", "null"]},
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
                "long_polls": {"type": "integer"}
            }}
        }}
    })
}

/// The document, serialized once.
pub fn document() -> &'static [u8] {
    static DOC: OnceLock<Vec<u8>> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_vec(&build()).unwrap_or_default())
}
