//! Zoom plans and their *Medium* rate limits: the one table both the daemon's limiter and the
//! local sandbox read, so the two can never disagree about what Zoom allows.

use serde::{Deserialize, Serialize};

/// A Zoom account plan. Selects the *Medium* rate limit of "Edit a chatbot message".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// 2 requests/s and 2,000 requests/day.
    Free,
    /// 20 requests/s.
    Pro,
    /// Business, Education, Enterprise, Partners: 60 requests/s.
    Business,
}

impl Plan {
    /// Medium requests per second Zoom allows one account on this plan.
    pub fn per_second(self) -> u32 {
        match self {
            Plan::Free => 2,
            Plan::Pro => 20,
            Plan::Business => 60,
        }
    }

    /// Medium requests per UTC day, where the plan has a daily cap.
    pub fn per_day(self) -> Option<u32> {
        match self {
            Plan::Free => Some(2_000),
            Plan::Pro | Plan::Business => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Business => "business",
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Plan::Free),
            "pro" => Ok(Plan::Pro),
            "business" => Ok(Plan::Business),
            other => Err(format!(
                "unknown plan {other:?}: expected \"free\", \"pro\" or \"business\""
            )),
        }
    }
}
