//! Request accounting per replica: every call a replica makes to its store, by kind (what a
//! bucket bills for), and an estimate of the month's requests from the last hour, so an
//! operator sees what a sync interval costs before the bill does.
//!
//! Counted per [`ObjectStore`] call, which is one request except for uploads bigger than a part
//! (S3 multipart: one PUT per part plus two) and listings of more than 1,000 keys (one LIST
//! per page); a file replica's calls are system calls, counted the same way so the idle
//! figures can be checked on any target.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

pub use crate::status::{RequestCounts, RequestKind};

use super::{Listing, ObjectInfo, ObjectReader, ObjectStore, Precondition, StoreError};

const HOUR: Duration = Duration::from_secs(3600);
/// A month of 30 days, in hours.
const HOURS_PER_MONTH: u64 = 30 * 24;
/// The first hour is extrapolated from at least this much time, so the burst of a start (a
/// listing, a snapshot) is not multiplied by 360.
const MIN_SAMPLE: Duration = Duration::from_secs(600);

/// Two hourly windows: the estimate is the last hour's requests (the previous window's share
/// that still lies within the last hour, plus the current one) times a month's hours.
#[derive(Debug)]
struct Windows {
    started: Instant,
    current: RequestCounts,
    previous: Option<RequestCounts>,
}

impl Windows {
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < HOUR {
            return;
        }
        self.previous = Some(if elapsed < 2 * HOUR {
            self.current
        } else {
            RequestCounts::default()
        });
        self.current = RequestCounts::default();
        let hours = (elapsed.as_secs() / 3600) as u32;
        self.started += HOUR * hours;
    }
}

/// One replica's request counters; shared by its store wrapper and the status publisher.
#[derive(Debug)]
pub struct RequestMeter {
    totals: [AtomicU64; 5],
    windows: Mutex<Windows>,
}

impl Default for RequestMeter {
    fn default() -> Self {
        RequestMeter {
            totals: Default::default(),
            windows: Mutex::new(Windows {
                started: Instant::now(),
                current: RequestCounts::default(),
                previous: None,
            }),
        }
    }
}

impl RequestMeter {
    pub fn add(&self, kind: RequestKind) {
        self.totals[kind as usize].fetch_add(1, Ordering::Relaxed);
        let mut w = self.windows.lock().expect("request windows");
        w.roll(Instant::now());
        *w.current.slot_mut(kind) += 1;
    }

    /// Every request since the replica was created.
    pub fn totals(&self) -> RequestCounts {
        let mut c = RequestCounts::default();
        for k in RequestKind::ALL {
            *c.slot_mut(k) = self.totals[k as usize].load(Ordering::Relaxed);
        }
        c
    }

    /// The requests of a 30-day month at the rate of the last hour.
    pub fn per_month(&self) -> RequestCounts {
        self.per_month_at(Instant::now())
    }

    fn per_month_at(&self, now: Instant) -> RequestCounts {
        let mut w = self.windows.lock().expect("request windows");
        w.roll(now);
        let into = now.saturating_duration_since(w.started);
        let mut out = RequestCounts::default();
        for k in RequestKind::ALL {
            let cur = w.current.get(k) as f64;
            let last_hour = match &w.previous {
                // The previous window's requests spread evenly over it.
                Some(p) => p.get(k) as f64 * (1.0 - into.as_secs_f64() / 3600.0) + cur,
                None => cur * 3600.0 / into.max(MIN_SAMPLE).as_secs_f64(),
            };
            *out.slot_mut(k) = (last_hour * HOURS_PER_MONTH as f64).round() as u64;
        }
        out
    }
}

/// An [`ObjectStore`] that counts the calls made through it in a [`RequestMeter`].
#[derive(Debug)]
pub struct Metered {
    inner: std::sync::Arc<dyn ObjectStore>,
    meter: std::sync::Arc<RequestMeter>,
}

impl Metered {
    pub fn new(
        inner: std::sync::Arc<dyn ObjectStore>,
        meter: std::sync::Arc<RequestMeter>,
    ) -> Self {
        Metered { inner, meter }
    }
}

#[async_trait]
impl ObjectStore for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn list(&self, dir: &str) -> Result<Listing, StoreError> {
        self.meter.add(RequestKind::List);
        self.inner.list(dir).await
    }
    async fn put(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.meter.add(RequestKind::Put);
        self.inner.put(key, body).await
    }
    async fn put_new(&self, key: &str, body: ObjectReader) -> Result<ObjectInfo, StoreError> {
        self.meter.add(RequestKind::Put);
        self.inner.put_new(key, body).await
    }
    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        self.meter.add(RequestKind::Get);
        self.inner.get(key).await
    }
    async fn get_stat(
        &self,
        key: &str,
    ) -> Result<(ObjectReader, Option<std::time::SystemTime>), StoreError> {
        self.meter.add(RequestKind::Get);
        self.inner.get_stat(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.meter.add(RequestKind::Get);
        self.inner.get_range(key, start, end, buf).await
    }
    async fn first(&self, dir: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.meter.add(RequestKind::List);
        self.inner.first(dir).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.meter.add(RequestKind::Head);
        self.inner.head(key).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        if !keys.is_empty() {
            self.meter.add(RequestKind::Delete);
        }
        self.inner.delete(keys).await
    }
    async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        self.meter.add(RequestKind::List);
        self.meter.add(RequestKind::Delete);
        self.inner.delete_dir(dir).await
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        self.meter.add(RequestKind::Get);
        self.inner.get_versioned(key).await
    }
    async fn put_if(
        &self,
        key: &str,
        data: Vec<u8>,
        cond: &Precondition,
    ) -> Result<Option<String>, StoreError> {
        self.meter.add(RequestKind::Put);
        self.inner.put_if(key, data, cond).await
    }
    async fn delete_if(&self, key: &str, version: &str) -> Result<bool, StoreError> {
        self.meter.add(RequestKind::Delete);
        self.inner.delete_if(key, version).await
    }
    async fn remove_incomplete(&self, older_than: Duration) -> Result<usize, StoreError> {
        self.meter.add(RequestKind::List);
        self.inner.remove_incomplete(older_than).await
    }
    fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_path(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_is_the_last_hour_times_a_month() {
        let m = RequestMeter::default();
        let t0 = m.windows.lock().unwrap().started;
        for _ in 0..10 {
            m.add(RequestKind::Put);
        }
        // Ten PUTs in the first 10 minutes: 60 an hour.
        let at = |d: u64| t0 + Duration::from_secs(d);
        assert_eq!(m.per_month_at(at(60)).put, 60 * 720);
        assert_eq!(m.per_month_at(at(1800)).put, 20 * 720);
        // Half an hour into the second hour with nothing new: half of the first hour remains.
        assert_eq!(m.per_month_at(at(5400)).put, 5 * 720);
        // Two idle hours later: nothing.
        assert_eq!(m.per_month_at(at(3 * 3600 + 10)).total(), 0);
        assert_eq!(m.totals().put, 10);
    }
}
