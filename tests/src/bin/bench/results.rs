//! Raw results: one [`Sample`] per (table, system, round), their medians, and the JSON file.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::scenarios::Metrics;
use crate::stats::median;
use crate::systems::System;

/// One run of one scenario against one system.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The table it belongs to: a scenario name, `ws-1000` for a WebSocket count.
    pub table: String,
    /// The system.
    pub system: System,
    /// The round (0-based).
    pub round: usize,
    /// What it measured.
    pub metrics: Metrics,
    /// Why it measured nothing (or only part).
    pub error: Option<String>,
}

/// Everything a run produced.
#[derive(Debug, Default)]
pub struct Results {
    /// Every sample, in the order taken.
    pub samples: Vec<Sample>,
    /// Systems that could not run, and why.
    pub skipped: Vec<(System, String)>,
    /// Lines for the report (a generator missing, a fallback).
    pub notes: Vec<String>,
}

impl Results {
    /// The median of `metric` over the rounds of `table` for `system`.
    pub fn median(&self, table: &str, system: System, metric: &str) -> Option<f64> {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.table == table && s.system == system)
            .flat_map(|s| {
                s.metrics
                    .iter()
                    .filter(|(k, _)| k == metric)
                    .map(|(_, v)| *v)
            })
            .collect();
        median(&values)
    }

    /// The tables that have samples, in the order first taken.
    pub fn tables(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.samples {
            if !out.contains(&s.table) {
                out.push(s.table.clone());
            }
        }
        out
    }

    /// The systems with samples in `table`, in table order.
    pub fn systems(&self, table: &str) -> Vec<System> {
        System::ALL
            .into_iter()
            .filter(|sys| {
                self.samples
                    .iter()
                    .any(|s| s.table == table && s.system == *sys)
            })
            .collect()
    }

    /// Errors of `table`, as report lines.
    pub fn errors(&self, table: &str) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.table == table)
            .filter_map(|s| {
                s.error
                    .as_ref()
                    .map(|e| format!("{} (round {}): {e}", s.system.name(), s.round + 1))
            })
            .collect()
    }

    /// The raw results and their medians as JSON.
    pub fn to_json(&self, meta: Value) -> Value {
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                let metrics: BTreeMap<&str, f64> =
                    s.metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                json!({
                    "table": s.table, "system": s.system.name(), "round": s.round + 1,
                    "metrics": metrics, "error": s.error,
                })
            })
            .collect();
        let mut medians = serde_json::Map::new();
        for table in self.tables() {
            let mut per_system = serde_json::Map::new();
            for system in self.systems(&table) {
                let mut names: Vec<&str> = self
                    .samples
                    .iter()
                    .filter(|s| s.table == table && s.system == system)
                    .flat_map(|s| s.metrics.iter().map(|(k, _)| k.as_str()))
                    .collect();
                names.sort_unstable();
                names.dedup();
                let m: BTreeMap<&str, Option<f64>> = names
                    .into_iter()
                    .map(|k| (k, self.median(&table, system, k)))
                    .collect();
                per_system.insert(system.name().to_owned(), json!(m));
            }
            medians.insert(table, Value::Object(per_system));
        }
        let skipped: Vec<Value> = self
            .skipped
            .iter()
            .map(|(s, why)| json!({ "system": s.name(), "why": why }))
            .collect();
        json!({
            "meta": meta, "skipped": skipped, "notes": self.notes,
            "medians": medians, "samples": samples,
        })
    }
}
