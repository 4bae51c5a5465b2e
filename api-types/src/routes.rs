//! The one table of routes the server serves; the router and the
//! openapi.yaml consistency test are both built from [`ROUTES`].

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    GetVm,
    PatchVm,
    ShutdownVm,
    GetBalloon,
    PatchBalloon,
    GetBalloonStats,
    PatchBalloonStats,
    HintingStart,
    HintingStatus,
    HintingStop,
    HintingDone,
    PutMigration,
    GetMigration,
    CancelMigration,
    PutSnapshot,
    GetMetrics,
    GetEvents,
}

/// One served `(method, path)` pair.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub endpoint: Endpoint,
}

const fn r(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route {
        method,
        path,
        endpoint,
    }
}

/// Every route the server serves. Paths are exact (no trailing slash, no
/// parameters); query strings are ignored.
pub const ROUTES: &[Route] = &[
    r("GET", "/vm", Endpoint::GetVm),
    r("PATCH", "/vm", Endpoint::PatchVm),
    r("PUT", "/vm/shutdown", Endpoint::ShutdownVm),
    r("GET", "/balloon", Endpoint::GetBalloon),
    r("PATCH", "/balloon", Endpoint::PatchBalloon),
    r("GET", "/balloon/statistics", Endpoint::GetBalloonStats),
    r("PATCH", "/balloon/statistics", Endpoint::PatchBalloonStats),
    r("PUT", "/balloon/hinting/start", Endpoint::HintingStart),
    r("GET", "/balloon/hinting/status", Endpoint::HintingStatus),
    r("PUT", "/balloon/hinting/stop", Endpoint::HintingStop),
    r("PUT", "/balloon/hinting/done", Endpoint::HintingDone),
    r("PUT", "/migration", Endpoint::PutMigration),
    r("GET", "/migration", Endpoint::GetMigration),
    r("DELETE", "/migration", Endpoint::CancelMigration),
    r("PUT", "/snapshot", Endpoint::PutSnapshot),
    r("GET", "/metrics", Endpoint::GetMetrics),
    r("GET", "/events", Endpoint::GetEvents),
];

/// Result of looking a request up in [`ROUTES`].
#[derive(Debug, PartialEq, Eq)]
pub enum Match {
    Found(Endpoint),
    /// The path exists but not with this method; the value is the `Allow` header.
    MethodNotAllowed(String),
    NotFound,
}

pub fn route(method: &str, path: &str) -> Match {
    let mut allow: Vec<&str> = Vec::new();
    for rt in ROUTES.iter().filter(|rt| rt.path == path) {
        if rt.method == method {
            return Match::Found(rt.endpoint);
        }
        allow.push(rt.method);
    }
    if allow.is_empty() {
        Match::NotFound
    } else {
        Match::MethodNotAllowed(allow.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn lookups() {
        assert_eq!(route("GET", "/vm"), Match::Found(Endpoint::GetVm));
        assert_eq!(
            route("DELETE", "/vm"),
            Match::MethodNotAllowed("GET, PATCH".into())
        );
        assert_eq!(route("GET", "/vm/"), Match::NotFound);
        assert_eq!(route("GET", "/nope"), Match::NotFound);
    }

    #[test]
    fn no_duplicates() {
        let mut seen = HashSet::new();
        for rt in ROUTES {
            assert!(seen.insert((rt.method, rt.path)), "{rt:?}");
        }
        let eps: HashSet<_> = ROUTES.iter().map(|r| r.endpoint).collect();
        assert_eq!(eps.len(), ROUTES.len());
    }
}
