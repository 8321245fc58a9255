//! The lead: captured, scored from its signals, assigned, qualified, then converted or
//! disqualified (`domain.md`, Lead). Stream `lead-{id}`.
//!
//! Invariants: the score is the sum of the points of every recorded signal; a lead is
//! qualified at most once; a closed lead (disqualified, converted, erased) never changes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::values::{Email, Label, Money, Name, Owner, PersonName, Reason, SignalKind, Source};
use crate::{Aggregate, ClaimChange, Command, DecodeError, DomainError, Event};

/// The score at which a new or working lead becomes qualified (an MQL).
pub const QUALIFYING_SCORE: u32 = 50;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadStatus {
    /// Not captured yet: the stream is empty.
    #[default]
    Absent,
    New,
    Working,
    Qualified,
    Converted,
    Disqualified,
    /// Its personal data shredded (`Erase`), its email free again.
    Erased,
}

impl LeadStatus {
    /// Every status a captured lead can be in, in the funnel's order: the words a client
    /// lists leads by.
    pub const CAPTURED: &'static [LeadStatus] = &[
        LeadStatus::New,
        LeadStatus::Working,
        LeadStatus::Qualified,
        LeadStatus::Converted,
        LeadStatus::Disqualified,
        LeadStatus::Erased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LeadStatus::Absent => "absent",
            LeadStatus::New => "new",
            LeadStatus::Working => "working",
            LeadStatus::Qualified => "qualified",
            LeadStatus::Converted => "converted",
            LeadStatus::Disqualified => "disqualified",
            LeadStatus::Erased => "erased",
        }
    }

    /// The status an `as_str` word names.
    pub fn parse(word: &str) -> Option<LeadStatus> {
        std::iter::once(LeadStatus::Absent)
            .chain(LeadStatus::CAPTURED.iter().copied())
            .find(|status| status.as_str() == word)
    }

    pub fn is_open(self) -> bool {
        matches!(
            self,
            LeadStatus::New | LeadStatus::Working | LeadStatus::Qualified
        )
    }

    /// The status after `event`: the one rule the aggregate and the lead board share.
    /// A lead is new when captured, working once assigned while new, and qualified,
    /// disqualified or converted by the events that say so; signals leave it as it is.
    pub fn after(self, event: &LeadEvent) -> LeadStatus {
        match event {
            LeadEvent::LeadCaptured { .. } => LeadStatus::New,
            LeadEvent::LeadAssigned { .. } if self == LeadStatus::New => LeadStatus::Working,
            LeadEvent::SignalRecorded { .. } | LeadEvent::LeadAssigned { .. } => self,
            LeadEvent::LeadQualified { .. } => LeadStatus::Qualified,
            LeadEvent::LeadDisqualified { .. } => LeadStatus::Disqualified,
            LeadEvent::LeadConverted { .. } => LeadStatus::Converted,
            LeadEvent::LeadErased {} => LeadStatus::Erased,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LeadCommand {
    Capture {
        lead_id: Uuid,
        email: Email,
        name: PersonName,
        company: Option<Label>,
        source: Source,
    },
    RecordSignal {
        kind: SignalKind,
        occurred_at: Option<DateTime<Utc>>,
    },
    Assign {
        owner: Owner,
    },
    Disqualify {
        reason: Reason,
    },
    /// The handler fills in the ids (the client's, or new ones) and the facts it looks
    /// up: whether a named account exists, whether the deal's id is taken.
    Convert {
        deal_name: Name,
        amount: Money,
        account: ConversionAccount,
        deal: ConversionDeal,
    },
    /// The right to erasure: the lead's personal data becomes unreadable everywhere.
    Erase {},
}

/// The account a conversion goes into, as the handler found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversionAccount {
    /// The client named none: the conversion opens a new account with this id.
    New(Uuid),
    /// The account the client named, which exists.
    Existing(Uuid),
    /// The account the client named, which does not exist: the conversion is refused.
    Unknown(Uuid),
}

impl ConversionAccount {
    pub fn id(self) -> Uuid {
        match self {
            ConversionAccount::New(id)
            | ConversionAccount::Existing(id)
            | ConversionAccount::Unknown(id) => id,
        }
    }
}

/// The deal a conversion opens, with the id the client gave or the handler made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversionDeal {
    /// No deal has this id yet.
    New(Uuid),
    /// A deal with this id exists already: the conversion is refused.
    Taken(Uuid),
}

impl ConversionDeal {
    pub fn id(self) -> Uuid {
        match self {
            ConversionDeal::New(id) | ConversionDeal::Taken(id) => id,
        }
    }
}

impl Command for LeadCommand {
    fn name(&self) -> &'static str {
        match self {
            LeadCommand::Capture { .. } => "Capture",
            LeadCommand::RecordSignal { .. } => "RecordSignal",
            LeadCommand::Assign { .. } => "Assign",
            LeadCommand::Disqualify { .. } => "Disqualify",
            LeadCommand::Convert { .. } => "Convert",
            LeadCommand::Erase {} => "Erase",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum LeadEvent {
    /// Schema v2 added `company`, always present (null when none); v1 events are read
    /// through the upcaster, which adds it. `email` and `name` are personal data
    /// (`PERSONAL_FIELDS`): stored sealed, and `None` once the lead is erased.
    LeadCaptured {
        lead_id: Uuid,
        email: Option<Email>,
        name: Option<PersonName>,
        #[serde(deserialize_with = "Option::deserialize")]
        company: Option<Label>,
        source: Source,
    },
    SignalRecorded {
        kind: SignalKind,
        points: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        occurred_at: Option<DateTime<Utc>>,
    },
    LeadQualified {
        score: u32,
    },
    LeadAssigned {
        owner: Owner,
        previous_owner: Option<Owner>,
    },
    LeadDisqualified {
        reason: Reason,
    },
    /// `account_name` is set when the conversion opens a new account (named after the
    /// lead's company, or the deal when there is none: never after the person).
    LeadConverted {
        account_id: Uuid,
        deal_id: Uuid,
        deal_name: Name,
        amount: Money,
        account_name: Option<Name>,
    },
    /// The lead's data key is destroyed with this event (`erases_subject`), and its
    /// email's claim given back (`Lead::claims`).
    LeadErased {},
}

impl Event for LeadEvent {
    fn event_type(&self) -> &'static str {
        match self {
            LeadEvent::LeadCaptured { .. } => "LeadCaptured",
            LeadEvent::SignalRecorded { .. } => "SignalRecorded",
            LeadEvent::LeadQualified { .. } => "LeadQualified",
            LeadEvent::LeadAssigned { .. } => "LeadAssigned",
            LeadEvent::LeadDisqualified { .. } => "LeadDisqualified",
            LeadEvent::LeadConverted { .. } => "LeadConverted",
            LeadEvent::LeadErased {} => "LeadErased",
        }
    }

    const PERSONAL_FIELDS: &'static [(&'static str, &'static [&'static str])] =
        &[("LeadCaptured", &["email", "name"])];

    /// A captured lead holds its email (as a hash), so no other lead can take it.
    fn claims(&self) -> Vec<ClaimChange> {
        match self {
            LeadEvent::LeadCaptured {
                email: Some(email), ..
            } => vec![ClaimChange::Take(email.claim_key())],
            _ => Vec::new(),
        }
    }

    fn erases_subject(&self) -> bool {
        matches!(self, LeadEvent::LeadErased {})
    }

    fn current_version(event_type: &str) -> u32 {
        match event_type {
            "LeadCaptured" => 2,
            _ => 1,
        }
    }

    fn upcast_step(
        event_type: &str,
        schema_version: u32,
        mut data: Value,
    ) -> Result<Value, DecodeError> {
        match (event_type, schema_version) {
            // v1 → v2: the company was not asked for.
            ("LeadCaptured", 1) => {
                if let Value::Object(fields) = &mut data {
                    fields.entry("company").or_insert(Value::Null);
                }
                Ok(data)
            }
            _ => Err(DecodeError {
                event_type: event_type.to_owned(),
                schema_version,
                reason: "no upcaster from this version".into(),
            }),
        }
    }
}

/// A lead as its events left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    pub id: Option<Uuid>,
    pub status: LeadStatus,
    pub email: Option<Email>,
    pub name: Option<PersonName>,
    pub company: Option<Label>,
    pub source: Option<Source>,
    /// The sum of the points of every recorded signal.
    pub score: u32,
    pub owner: Option<Owner>,
    /// Set once, by `LeadQualified`.
    pub qualified: bool,
    pub converted_deal_id: Option<Uuid>,
    pub converted_account_id: Option<Uuid>,
}

impl Lead {
    fn open(&self) -> Result<(), DomainError> {
        match self.status {
            LeadStatus::Absent => Err(DomainError::LeadNotFound),
            status if status.is_open() => Ok(()),
            status => Err(DomainError::LeadClosed {
                status: status.as_str(),
            }),
        }
    }
}

impl Aggregate for Lead {
    type Command = LeadCommand;
    type Event = LeadEvent;
    const CATEGORY: &'static str = "lead";
    const SNAPSHOT_VERSION: u32 = 1;

    /// An erasure gives back the email's claim, which only the state knows.
    fn claims(&self, event: &LeadEvent) -> Vec<ClaimChange> {
        match (event, &self.email) {
            (LeadEvent::LeadErased {}, Some(email)) => {
                vec![ClaimChange::Release(email.claim_key())]
            }
            _ => event.claims(),
        }
    }

    /// The only key a lead takes is its email's: held by another lead, it is a
    /// duplicate of that lead.
    fn claim_held(key: &str, holder_stream: &str) -> DomainError {
        let holder = holder_stream
            .strip_prefix("lead-")
            .and_then(|id| Uuid::parse_str(id).ok());
        match holder {
            Some(existing) => DomainError::DuplicateEmail { existing },
            None => DomainError::KeyTaken(key.to_owned()),
        }
    }

    fn decide(&self, command: LeadCommand) -> Result<Vec<LeadEvent>, DomainError> {
        match command {
            LeadCommand::Capture {
                lead_id,
                email,
                name,
                company,
                source,
            } => {
                if let Some(id) = self.id {
                    return Err(DomainError::LeadExists(id));
                }
                Ok(vec![LeadEvent::LeadCaptured {
                    lead_id,
                    email: Some(email),
                    name: Some(name),
                    company,
                    source,
                }])
            }
            LeadCommand::RecordSignal { kind, occurred_at } => {
                self.open()?;
                let points = kind.points();
                let mut events = vec![LeadEvent::SignalRecorded {
                    kind,
                    points,
                    occurred_at,
                }];
                let score = self.score.saturating_add(points);
                let may_qualify = matches!(self.status, LeadStatus::New | LeadStatus::Working);
                if may_qualify && !self.qualified && score >= QUALIFYING_SCORE {
                    events.push(LeadEvent::LeadQualified { score });
                }
                Ok(events)
            }
            LeadCommand::Assign { owner } => {
                self.open()?;
                if self.owner.as_ref() == Some(&owner) {
                    return Err(DomainError::AlreadyAssigned(owner.to_string()));
                }
                Ok(vec![LeadEvent::LeadAssigned {
                    owner,
                    previous_owner: self.owner.clone(),
                }])
            }
            LeadCommand::Disqualify { reason } => {
                self.open()?;
                Ok(vec![LeadEvent::LeadDisqualified { reason }])
            }
            LeadCommand::Convert {
                deal_name,
                amount,
                account,
                deal,
            } => {
                self.open()?;
                if self.status != LeadStatus::Qualified {
                    return Err(DomainError::LeadNotQualified {
                        status: self.status.as_str(),
                    });
                }
                if let ConversionAccount::Unknown(_) = account {
                    return Err(DomainError::AccountNotFound);
                }
                if let ConversionDeal::Taken(deal_id) = deal {
                    return Err(DomainError::DealExists(deal_id));
                }
                // A new account is named after the lead's company, or else after the deal:
                // never after the person, whose name is personal data an erasure must
                // reach (`domain.md`, Erasure), and an account's name is the business's.
                let account_name = if let ConversionAccount::New(_) = account {
                    Some(match &self.company {
                        Some(company) => Name::parse(company.as_str())?,
                        None => deal_name.clone(),
                    })
                } else {
                    None
                };
                Ok(vec![LeadEvent::LeadConverted {
                    account_id: account.id(),
                    deal_id: deal.id(),
                    deal_name,
                    amount,
                    account_name,
                }])
            }
            LeadCommand::Erase {} => match self.status {
                LeadStatus::Absent => Err(DomainError::LeadNotFound),
                LeadStatus::Erased => Err(DomainError::LeadClosed {
                    status: LeadStatus::Erased.as_str(),
                }),
                _ => Ok(vec![LeadEvent::LeadErased {}]),
            },
        }
    }

    fn evolve(mut self, event: &LeadEvent) -> Self {
        self.status = self.status.after(event);
        match event {
            LeadEvent::LeadCaptured {
                lead_id,
                email,
                name,
                company,
                source,
            } => {
                self.id = Some(*lead_id);
                self.email = email.clone();
                self.name = name.clone();
                self.company = company.clone();
                self.source = Some(*source);
            }
            LeadEvent::SignalRecorded { points, .. } => {
                self.score = self.score.saturating_add(*points);
            }
            LeadEvent::LeadQualified { .. } => self.qualified = true,
            LeadEvent::LeadAssigned { owner, .. } => self.owner = Some(owner.clone()),
            LeadEvent::LeadDisqualified { .. } => {}
            LeadEvent::LeadConverted {
                account_id,
                deal_id,
                ..
            } => {
                self.converted_account_id = Some(*account_id);
                self.converted_deal_id = Some(*deal_id);
            }
            LeadEvent::LeadErased {} => {
                self.email = None;
                self.name = None;
            }
        }
        self
    }
}
