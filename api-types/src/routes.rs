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
    /// Firecracker's `PUT /balloon`.
    PutBalloon,
    GetBalloonStats,
    PatchBalloonStats,
    GetBalloonPolicy,
    PutBalloonPolicy,
    PatchBalloonPolicy,
    HintingStart,
    HintingStatus,
    HintingStop,
    HintingDone,
    /// Firecracker's `PATCH /balloon/hinting/start` (204, no body back).
    FcHintingStart,
    /// Firecracker's `PATCH /balloon/hinting/stop`: DONE, like `HintingDone`.
    FcHintingStop,
    PutMigration,
    GetMigration,
    CancelMigration,
    PutSnapshot,
    GetMetrics,
    GetEvents,
}

impl Endpoint {
    /// A `/balloon` route: Firecracker has the same paths, so errors there
    /// carry its `fault_message` next to Blimp's `error`.
    pub fn is_balloon(self) -> bool {
        matches!(
            self,
            Endpoint::GetBalloon
                | Endpoint::PatchBalloon
                | Endpoint::PutBalloon
                | Endpoint::GetBalloonStats
                | Endpoint::PatchBalloonStats
                | Endpoint::GetBalloonPolicy
                | Endpoint::PutBalloonPolicy
                | Endpoint::PatchBalloonPolicy
                | Endpoint::HintingStart
                | Endpoint::HintingStatus
                | Endpoint::HintingStop
                | Endpoint::HintingDone
                | Endpoint::FcHintingStart
                | Endpoint::FcHintingStop
        )
    }
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
/// parameters); query strings are ignored. The balloon routes include
/// Firecracker's (`PUT /balloon`, `PATCH /balloon {"amount_mib"}`, `PATCH
/// /balloon/hinting/start|stop`), whose errors also carry Firecracker's
/// `fault_message`.
pub const ROUTES: &[Route] = &[
    r("GET", "/vm", Endpoint::GetVm),
    r("PATCH", "/vm", Endpoint::PatchVm),
    r("PUT", "/vm/shutdown", Endpoint::ShutdownVm),
    r("GET", "/balloon", Endpoint::GetBalloon),
    r("PATCH", "/balloon", Endpoint::PatchBalloon),
    r("PUT", "/balloon", Endpoint::PutBalloon),
    r("GET", "/balloon/statistics", Endpoint::GetBalloonStats),
    r("PATCH", "/balloon/statistics", Endpoint::PatchBalloonStats),
    r("GET", "/balloon/policy", Endpoint::GetBalloonPolicy),
    r("PUT", "/balloon/policy", Endpoint::PutBalloonPolicy),
    r("PATCH", "/balloon/policy", Endpoint::PatchBalloonPolicy),
    r("PUT", "/balloon/hinting/start", Endpoint::HintingStart),
    r("GET", "/balloon/hinting/status", Endpoint::HintingStatus),
    r("PUT", "/balloon/hinting/stop", Endpoint::HintingStop),
    r("PUT", "/balloon/hinting/done", Endpoint::HintingDone),
    // Firecracker's methods for its hinting routes, next to Blimp's.
    r("PATCH", "/balloon/hinting/start", Endpoint::FcHintingStart),
    r("PATCH", "/balloon/hinting/stop", Endpoint::FcHintingStop),
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
        assert_eq!(
            route("PATCH", "/balloon/hinting/stop"),
            Match::Found(Endpoint::FcHintingStop)
        );
        assert_eq!(route("PUT", "/balloon"), Match::Found(Endpoint::PutBalloon));
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

    #[test]
    fn balloon_endpoints() {
        for rt in ROUTES {
            assert_eq!(
                rt.endpoint.is_balloon(),
                rt.path.starts_with("/balloon"),
                "{rt:?}"
            );
        }
    }
}
