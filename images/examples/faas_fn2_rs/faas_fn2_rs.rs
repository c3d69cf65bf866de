//! faas_fn2_rs: Layotto's FaaS demo function_2 (id `id_2`) on the Layotto Rust SDK.
//!
//! The book name is the request body (layotto_invoke delivers its data as a POST body), or
//! the `name` query parameter for a direct `GET /?name=book1`. Answers the value of that key
//! in state store `state_demo` (capability: state), e.g. "100"; 404 when the key is absent.

use layotto::http::{Request, Response};

fn handle(req: &Request) -> layotto::Result<Response> {
    let name = if req.body.is_empty() {
        match req.query_param("name") {
            Some(name) if !name.is_empty() => name,
            _ => return Ok(Response::text("missing the book name\n").status(400)),
        }
    } else {
        req.body_str().into_owned()
    };
    match layotto::state_get("state_demo", &name) {
        Ok(Some(value)) => Ok(Response::new(200)
            .header("content-type", "text/plain; charset=utf-8")
            .body(value)),
        Ok(None) => Ok(Response::text(format!("no inventory for {}\n", name)).status(404)),
        Err(status) => {
            layotto::log(layotto::Level::Warn, &format!("state_demo get {}: {}", name, status));
            Ok(Response::text(format!("state_demo: {}\n", status)).status(502))
        }
    }
}

layotto::http_handler!(handle);
