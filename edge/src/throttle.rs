//! The limits step: a tunnel's request rate (429 past it, with `Retry-After`) and its devbox's
//! requests in flight (503 past it). The counters are [`limits`](crate::limits)'; this step
//! decides what a request over them is told, and counts it.
//!
//! An idle kept-alive connection in the [`Pool`] keeps its devbox's place (it still holds a
//! stream of the agent), so a devbox at its limit first gives up its oldest idle connection,
//! and only a devbox whose places are all taken by requests really in flight gets the 503.

use std::sync::Arc;

use http::StatusCode;
use http::header::{self, HeaderValue};

use crate::activity::{self, Activity};
use crate::limits::{Limits, PerKey, Rate, Slot};
use crate::metrics::{GaugeGuard, Metrics};
use crate::pages::{self, Answer};
use crate::pool::Pool;
use crate::route::Routed;

/// The limits step: a rate per tunnel key, a count of requests in flight per devbox.
#[derive(Debug)]
pub struct Throttle {
    /// Requests a second per tunnel, as configured (for the 429's explanation).
    rate: u32,
    rates: Rate<String>,
    in_flight: PerKey<String>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
}

/// A request's place among its devbox's requests in flight: held as long as the request (or
/// the upgraded connection, or the response body) lives, and counted in
/// `burrow_edge_requests_in_flight` as long.
#[derive(Debug)]
pub struct InFlight {
    slot: Slot<String>,
    counted: GaugeGuard,
    activity: Option<Activity>,
}

impl InFlight {
    /// The devbox's activity, for a tunnel whose traffic counts as such (`http_keep_alive`).
    pub fn activity(&self) -> Option<Activity> {
        self.activity.clone()
    }

    /// The devbox's place, which an idle kept-alive connection keeps after the request, apart
    /// from the request's count in `burrow_edge_requests_in_flight`, which ends with it.
    pub fn into_parts(self) -> (Slot<String>, GaugeGuard) {
        (self.slot, self.counted)
    }
}

impl Throttle {
    /// The limits of `limits` (`rate`, `burst`, `streams_per_devbox`); the idle connections of
    /// `pool` hold places among a devbox's streams too.
    pub fn new(limits: &Limits, pool: Arc<Pool>, metrics: Arc<Metrics>) -> Throttle {
        Throttle {
            rate: limits.rate,
            rates: Rate::new(f64::from(limits.rate), f64::from(limits.burst)),
            in_flight: PerKey::new(limits.streams_per_devbox),
            pool,
            metrics,
        }
    }

    /// Takes a token of the tunnel's rate and a place among the devbox's requests in flight,
    /// or answers the request here.
    pub fn admit(&self, routed: &Routed) -> Result<InFlight, Answer> {
        if let Err(wait) = self.rates.take(&routed.target.key) {
            self.metrics.limited.with_label_values(&["rate"]).inc();
            let mut response = pages::error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "this tunnel is over its request rate ({} a second); slow down",
                    self.rate
                ),
                routed.form,
            );
            let secs = wait.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return Err(response);
        }
        let devbox = &routed.route.devbox_id;
        // At the limit, an idle connection's place is handed over whole, never given back
        // first: another request could take it in between.
        let slot = self
            .in_flight
            .acquire(devbox)
            .or_else(|| self.pool.evict_for_devbox(devbox))
            .ok_or_else(|| {
                self.metrics.limited.with_label_values(&["streams"]).inc();
                pages::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this devbox has too many requests in flight; try again shortly",
                    routed.form,
                )
            })?;
        let activity = routed.route.activity.clone();
        activity::touch(activity.as_ref());
        Ok(InFlight {
            slot,
            counted: GaugeGuard::new(&self.metrics.requests_in_flight),
            activity,
        })
    }
}

#[cfg(test)]
mod tests {
    use burrow_protocol::{AuthMode, Port};

    use super::*;
    use crate::pages::Form;
    use crate::registry::Route;
    use crate::route::{Scheme, Target};

    fn routed(key: &str, devbox: &str) -> Routed {
        Routed {
            host: format!("3000-{key}.tunnel.example.com"),
            target: Target {
                port: Port::new(3000).expect("non-zero"),
                key: key.to_owned(),
            },
            route: Route {
                devbox_id: devbox.to_owned(),
                auth_mode: AuthMode::Open,
                auth_token: None,
                rewrite_host: false,
                raw_tcp: false,
                activity: None,
                wake_on_http: false,
                conn: None,
                attaches: 0,
            },
            client: ([192, 0, 2, 1], 40000).into(),
            scheme: Scheme::Http,
            form: Form::Text,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_rate_is_429_and_over_the_streams_503() {
        let limits = Limits {
            rate: 1,
            burst: 1,
            streams_per_devbox: 1,
            ..Limits::default()
        };
        let metrics = Metrics::new();
        let pool = Pool::new(4, 4, std::time::Duration::from_secs(30), metrics.clone());
        let throttle = Throttle::new(&limits, pool, metrics.clone());
        let slot = throttle.admit(&routed("a", "d1")).expect("first request");
        assert_eq!(metrics.requests_in_flight.get(), 1);
        let limited = throttle
            .admit(&routed("a", "d1"))
            .expect_err("over the rate");
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "1");
        let busy = throttle
            .admit(&routed("b", "d1"))
            .expect_err("over the streams");
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(throttle.admit(&routed("c", "d2")).is_ok(), "another devbox");
        assert_eq!(
            metrics.requests_in_flight.get(),
            1,
            "refused or done: not counted"
        );
        drop(slot);
        assert_eq!(metrics.requests_in_flight.get(), 0);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(
            throttle.admit(&routed("a", "d1")).is_ok(),
            "a second later, with the slot back"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_its_place_until_a_request_needs_it() {
        let limits = Limits {
            streams_per_devbox: 1,
            ..Limits::default()
        };
        let metrics = Metrics::new();
        let pool = Pool::new(4, 4, std::time::Duration::from_secs(30), metrics.clone());
        let throttle = Throttle::new(&limits, pool.clone(), metrics.clone());
        let (slot, counted) = throttle
            .admit(&routed("a", "d1"))
            .expect("first")
            .into_parts();
        drop(counted);
        assert_eq!(
            metrics.requests_in_flight.get(),
            0,
            "an idle one is not in flight"
        );
        let link = crate::h1::testing::Link::new().await;
        pool.checkin((1, 3000), link.conn().await, slot);
        assert_eq!(pool.idle_count(), 1, "the connection is pooled");
        assert!(throttle.admit(&routed("b", "d2")).is_ok(), "another devbox");
        let second = throttle
            .admit(&routed("a", "d1"))
            .expect("the idle one's place");
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(metrics.pool_idle.get(), 0);
        let evicted = &metrics.pool_evictions;
        assert_eq!(evicted.with_label_values(&["devbox_limit"]).get(), 1);
        let busy = throttle
            .admit(&routed("a", "d1"))
            .expect_err("in flight for real");
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(second);
        assert!(throttle.admit(&routed("a", "d1")).is_ok());
    }
}
