//! Accounting: every operation either succeeded or failed inside a fault window that allows
//! it to; the rest are violations, printed with what they met.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::faults::{Fault, Window};
use crate::load::{Kind, Op};

/// Why a failure is not explained by a fault.
#[derive(Debug)]
pub struct Violation {
    /// The operation.
    pub op: Op,
    /// The faults it overlapped (none: it failed outside every window).
    pub during: Vec<Fault>,
}

/// The sums the report prints.
#[derive(Debug, Default)]
pub struct Accounts {
    /// Per kind: (succeeded, failed inside a window that allows it).
    pub by_kind: BTreeMap<Kind, (u64, u64)>,
    /// Per fault: failures it explains, by kind.
    pub by_fault: BTreeMap<Fault, BTreeMap<Kind, u64>>,
    /// Per fault: how many of its failures gave each error.
    pub errors: BTreeMap<Fault, BTreeMap<String, u64>>,
    /// Failures nothing explains.
    pub violations: Vec<Violation>,
}

/// Whether `window`'s fault may make `op` fail: an operation already running when it took
/// effect unless the fault spares running ones, a later one unless it spares new ones.
fn allows(window: &Window, op: &Op) -> bool {
    if op.start < window.effect {
        !window.fault.spares_running()
    } else {
        !window.fault.spares_new()
    }
}

/// Accounts for every operation against the fault windows.
pub fn account(ops: &[Op], windows: &[Window]) -> Accounts {
    let mut accounts = Accounts::default();
    for op in ops {
        let entry = accounts.by_kind.entry(op.kind).or_default();
        if op.error.is_none() {
            entry.0 += 1;
            continue;
        }
        let touched: Vec<&Window> = windows
            .iter()
            .filter(|w| w.touches(op.start, op.end))
            .collect();
        // The fault the failure is charged to: of those that allow it, the one it failed
        // during (else in the grace after), the latest begun.
        let charged = touched
            .iter()
            .filter(|w| allows(w, op))
            .max_by_key(|w| (op.end <= w.end, w.start));
        match charged {
            Some(w) => {
                entry.1 += 1;
                *accounts
                    .by_fault
                    .entry(w.fault)
                    .or_default()
                    .entry(op.kind)
                    .or_default() += 1;
                let error = op.error.as_deref().map_or(String::new(), first_words);
                *accounts
                    .errors
                    .entry(w.fault)
                    .or_default()
                    .entry(error)
                    .or_default() += 1;
            }
            None => accounts.violations.push(Violation {
                op: op.clone(),
                during: touched.iter().map(|w| w.fault).collect(),
            }),
        }
    }
    accounts
}

/// Prints the operations and faults tables and the violations (at most 20, with the rest
/// counted).
pub fn print(accounts: &Accounts, windows: &[Window], t0: Instant) {
    println!("| operation | succeeded | failed inside a fault window | failed outside |");
    println!("| --- | ---: | ---: | ---: |");
    for kind in Kind::ALL {
        let (ok, explained) = accounts.by_kind.get(&kind).copied().unwrap_or_default();
        let unexplained = accounts
            .violations
            .iter()
            .filter(|v| v.op.kind == kind)
            .count();
        println!("| {kind} | {ok} | {explained} | {unexplained} |");
    }
    println!();
    println!(
        "| fault | injected | whole again after: p50 | max | operations failed in its windows |"
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    for fault in Fault::ALL {
        let mut took: Vec<Duration> = windows
            .iter()
            .filter(|w| w.fault == fault)
            .map(|w| w.end - w.start)
            .collect();
        if took.is_empty() {
            continue;
        }
        took.sort();
        let failed = accounts
            .by_fault
            .get(&fault)
            .map_or("none".to_owned(), |m| {
                let parts: Vec<String> = m.iter().map(|(k, n)| format!("{n} {k}")).collect();
                parts.join(", ")
            });
        println!(
            "| {fault} | {} | {} ms | {} ms | {failed} |",
            took.len(),
            took[took.len() / 2].as_millis(),
            took[took.len() - 1].as_millis(),
        );
    }
    println!("\nWhat the failures in each fault's windows said (the commonest three):\n");
    for (fault, errors) in &accounts.errors {
        let mut common: Vec<(&String, &u64)> = errors.iter().collect();
        common.sort_by(|a, b| b.1.cmp(a.1));
        let said: Vec<String> = common
            .iter()
            .take(3)
            .map(|(e, n)| format!("{n} x `{e}`"))
            .collect();
        println!("- {fault}: {}", said.join("; "));
    }
    if accounts.violations.is_empty() {
        return;
    }
    println!(
        "\n{} failures outside what the faults allow:",
        accounts.violations.len()
    );
    for v in accounts.violations.iter().take(20) {
        let during = if v.during.is_empty() {
            "outside every fault window".to_owned()
        } else {
            let names: Vec<String> = v.during.iter().map(ToString::to_string).collect();
            format!("during {}, which should have spared it", names.join(", "))
        };
        println!(
            "- {} from {:.2} s to {:.2} s, {during}: {}",
            v.op.kind,
            (v.op.start - t0).as_secs_f64(),
            (v.op.end - t0).as_secs_f64(),
            v.op.error.as_deref().unwrap_or("")
        );
    }
    if accounts.violations.len() > 20 {
        println!("- and {} more", accounts.violations.len() - 20);
    }
}

/// An error message without the parts that differ between operations (numbers, hosts), so
/// the same failure is counted once: its first 80 characters with digits masked.
fn first_words(error: &str) -> String {
    error
        .chars()
        .take(80)
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect()
}
