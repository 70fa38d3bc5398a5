//! `resize`: an image resizer in the style of a Lambda@Edge function.
//!
//! `GET /images/{w}x{h}/{name}` fetches `http://<origin>/images/{name}` (origin
//! group from the wasi:config key `origin`, default `api`), decodes it (PNG or
//! JPEG), resizes it to exactly w×h (each 1..=2048) and answers a PNG with
//! `cache-control: public, max-age=86400`, so the edge cache keeps it.
//!
//! Origin 404 → 404; malformed path or size → 400; other origin failures or an
//! image that does not decode → 502.

use std::io::Cursor;

use image::{ImageFormat, imageops::FilterType};
use outpost_guest::{
    config_get, exports::wasi::http::incoming_handler::Guest, read_body, req_header, respond,
    respond_error, send,
};
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingRequest, ResponseOutparam, Scheme,
};

/// Largest accepted width or height.
const MAX_SIDE: u32 = 2048;
/// Largest source image fetched from the origin.
const MAX_SOURCE: usize = 16 << 20;

struct Resize;

/// `/images/{w}x{h}/{name}` → (w, h, name). `Err` is the 400 reason.
fn parse_path(path: &str) -> Result<(u32, u32, &str), String> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let rest = path
        .strip_prefix("/images/")
        .ok_or_else(|| "expected /images/{w}x{h}/{name}".to_owned())?;
    let (size, name) = rest
        .split_once('/')
        .ok_or_else(|| "expected /images/{w}x{h}/{name}".to_owned())?;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("bad image name {name:?}"));
    }
    let (w, h) = size
        .split_once('x')
        .ok_or_else(|| format!("bad size {size:?}, expected WxH"))?;
    let side = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|v| (1..=MAX_SIDE).contains(v))
            .ok_or_else(|| format!("bad size {size:?}: each side must be 1..={MAX_SIDE}"))
    };
    Ok((side(w)?, side(h)?, name))
}

impl Guest for Resize {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let rid = req_header(&request, "x-request-id");
        let rid = rid.as_deref();
        if !matches!(request.method(), Method::Get) {
            return respond_error(
                out,
                405,
                &[("allow", "GET")],
                "method_not_allowed",
                "only GET",
                rid,
            );
        }
        let path = request.path_with_query().unwrap_or_default();
        let (w, h, name) = match parse_path(&path) {
            Ok(p) => p,
            Err(reason) => return respond_error(out, 400, &[], "bad_request", &reason, rid),
        };
        let origin = match config_get("origin") {
            Ok(o) => o
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "api".to_owned()),
            Err(e) => return respond_error(out, 500, &[], "config_unavailable", &e, rid),
        };

        // Fetch the original.
        let headers = Fields::new();
        if let Some(r) = rid {
            let _ = headers.append("x-request-id", r.as_bytes());
        }
        let req = OutgoingRequest::new(headers);
        let _ = req.set_scheme(Some(&Scheme::Http));
        let _ = req.set_authority(Some(&origin));
        let _ = req.set_path_with_query(Some(&format!("/images/{name}")));
        let resp = match send(req) {
            Ok(r) => r,
            Err(code) => {
                return respond_error(out, 502, &[], "bad_gateway", &format!("{code:?}"), rid);
            }
        };
        match resp.status() {
            200 => {}
            404 => {
                return respond_error(out, 404, &[], "not_found", &format!("no image {name}"), rid);
            }
            s => {
                return respond_error(
                    out,
                    502,
                    &[],
                    "bad_gateway",
                    &format!("origin answered {s}"),
                    rid,
                );
            }
        }
        let bytes = match resp
            .consume()
            .map_err(|()| "body taken".to_owned())
            .and_then(|b| read_body(b, MAX_SOURCE))
        {
            Ok(b) => b,
            Err(e) => {
                return respond_error(
                    out,
                    502,
                    &[],
                    "bad_gateway",
                    &format!("origin body: {e}"),
                    rid,
                );
            }
        };
        drop(resp);

        // Decode, resize, encode.
        let img = match image::load_from_memory(&bytes) {
            Ok(i) => i,
            Err(e) => {
                return respond_error(out, 502, &[], "undecodable", &format!("{name}: {e}"), rid);
            }
        };
        drop(bytes);
        let resized = img.resize_exact(w, h, FilterType::Triangle);
        drop(img);
        let mut png = Cursor::new(Vec::new());
        if let Err(e) = resized.write_to(&mut png, ImageFormat::Png) {
            return respond_error(out, 500, &[], "encode_failed", &e.to_string(), rid);
        }
        let png = png.into_inner();
        let len = png.len().to_string();
        respond(
            out,
            200,
            &[
                ("content-type", "image/png"),
                ("content-length", &len),
                ("cache-control", "public, max-age=86400"),
            ],
            &png,
        );
    }
}

outpost_guest::export!(Resize);

#[cfg(test)]
mod tests {
    use super::parse_path;

    #[test]
    fn paths() {
        assert_eq!(parse_path("/images/10x20/a.png"), Ok((10, 20, "a.png")));
        assert_eq!(parse_path("/images/10x20/a.png?v=1"), Ok((10, 20, "a.png")));
        assert!(parse_path("/images/0x20/a.png").is_err());
        assert!(parse_path("/images/2049x20/a.png").is_err());
        assert!(parse_path("/images/10x20/").is_err());
        assert!(parse_path("/images/10x20/a/b.png").is_err());
        assert!(parse_path("/images/10/a.png").is_err());
        assert!(parse_path("/other/10x20/a.png").is_err());
    }
}
