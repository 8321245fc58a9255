//! The deal: an opportunity moving through the sales funnel to won or lost
//! (`domain.md`, Deal). Stream `deal-{id}`.
//!
//! Invariants: stages only move forward; a closed deal (won or lost) never changes; the
//! amount keeps the currency the deal was opened in.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::{Money, Name, Owner, Reason, Stage};
use crate::{Aggregate, Command, DomainError, Event};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DealStatus {
    /// Not opened yet: the stream is empty.
    #[default]
    Absent,
    Open,
    Won,
    Lost,
}

impl DealStatus {
    /// The statuses of a closed deal: the words a client lists closed deals by.
    pub const CLOSED: &'static [DealStatus] = &[DealStatus::Won, DealStatus::Lost];

    pub fn as_str(self) -> &'static str {
        match self {
            DealStatus::Absent => "absent",
            DealStatus::Open => "open",
            DealStatus::Won => "won",
            DealStatus::Lost => "lost",
        }
    }

    /// The closed status a word names (`won`, `lost`), if it names one.
    pub fn closed(word: &str) -> Option<DealStatus> {
        DealStatus::parse(word).filter(|status| DealStatus::CLOSED.contains(status))
    }

    /// The status an `as_str` word names.
    pub fn parse(word: &str) -> Option<DealStatus> {
        [
            DealStatus::Absent,
            DealStatus::Open,
            DealStatus::Won,
            DealStatus::Lost,
        ]
        .into_iter()
        .find(|status| status.as_str() == word)
    }

    /// The status after `event`: the one rule the aggregate and the deal board share.
    pub fn after(self, event: &DealEvent) -> DealStatus {
        match event {
            DealEvent::DealOpened { .. } => DealStatus::Open,
            DealEvent::DealStageChanged { .. } | DealEvent::DealAmountChanged { .. } => self,
            DealEvent::DealWon { .. } => DealStatus::Won,
            DealEvent::DealLost { .. } => DealStatus::Lost,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DealCommand {
    /// `account_exists` is a fact the handler looks up: a deal is opened only for an
    /// account that exists.
    Open {
        deal_id: Uuid,
        account_id: Uuid,
        account_exists: bool,
        name: Name,
        amount: Money,
        owner: Option<Owner>,
        expected_close: Option<NaiveDate>,
    },
    Advance {
        stage: Stage,
    },
    ChangeAmount {
        amount: Money,
    },
    Win,
    Lose {
        reason: Reason,
    },
}

impl Command for DealCommand {
    fn name(&self) -> &'static str {
        match self {
            DealCommand::Open { .. } => "OpenDeal",
            DealCommand::Advance { .. } => "AdvanceDeal",
            DealCommand::ChangeAmount { .. } => "ChangeDealAmount",
            DealCommand::Win => "WinDeal",
            DealCommand::Lose { .. } => "LoseDeal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum DealEvent {
    DealOpened {
        deal_id: Uuid,
        account_id: Uuid,
        name: Name,
        amount: Money,
        owner: Option<Owner>,
        expected_close: Option<NaiveDate>,
        stage: Stage,
    },
    DealStageChanged {
        from: Stage,
        to: Stage,
    },
    DealAmountChanged {
        from: Money,
        to: Money,
    },
    DealWon {
        amount: Money,
    },
    DealLost {
        reason: Reason,
    },
}

impl Event for DealEvent {
    fn event_type(&self) -> &'static str {
        match self {
            DealEvent::DealOpened { .. } => "DealOpened",
            DealEvent::DealStageChanged { .. } => "DealStageChanged",
            DealEvent::DealAmountChanged { .. } => "DealAmountChanged",
            DealEvent::DealWon { .. } => "DealWon",
            DealEvent::DealLost { .. } => "DealLost",
        }
    }

    fn current_version(_event_type: &str) -> u32 {
        1
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Deal {
    pub id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub status: DealStatus,
    pub name: Option<Name>,
    pub amount: Option<Money>,
    pub owner: Option<Owner>,
    pub expected_close: Option<NaiveDate>,
    pub stage: Option<Stage>,
}

impl Deal {
    /// The stage and amount of an open deal, or why the deal cannot change.
    fn open(&self) -> Result<(Stage, &Money), DomainError> {
        match (self.status, self.stage, &self.amount) {
            (DealStatus::Open, Some(stage), Some(amount)) => Ok((stage, amount)),
            (DealStatus::Absent, ..) => Err(DomainError::DealNotFound),
            (status, ..) => Err(DomainError::DealClosed {
                status: status.as_str(),
            }),
        }
    }
}

impl Aggregate for Deal {
    type Command = DealCommand;
    type Event = DealEvent;
    const CATEGORY: &'static str = "deal";
    const SNAPSHOT_VERSION: u32 = 1;

    fn decide(&self, command: DealCommand) -> Result<Vec<DealEvent>, DomainError> {
        match command {
            DealCommand::Open {
                deal_id,
                account_id,
                account_exists,
                name,
                amount,
                owner,
                expected_close,
            } => {
                if let Some(id) = self.id {
                    return Err(DomainError::DealExists(id));
                }
                if !account_exists {
                    return Err(DomainError::AccountNotFound);
                }
                Ok(vec![DealEvent::DealOpened {
                    deal_id,
                    account_id,
                    name,
                    amount,
                    owner,
                    expected_close,
                    stage: Stage::Prospecting,
                }])
            }
            DealCommand::Advance { stage } => {
                let (from, _) = self.open()?;
                if stage <= from {
                    return Err(DomainError::StageNotLater {
                        from: from.as_str(),
                        to: stage.as_str(),
                    });
                }
                Ok(vec![DealEvent::DealStageChanged { from, to: stage }])
            }
            DealCommand::ChangeAmount { amount } => {
                let (_, current) = self.open()?;
                if amount.currency != current.currency {
                    return Err(DomainError::CurrencyMismatch {
                        deal: current.currency.as_str().to_owned(),
                        given: amount.currency.as_str().to_owned(),
                    });
                }
                if amount == *current {
                    return Err(DomainError::SameAmount(amount.to_string()));
                }
                Ok(vec![DealEvent::DealAmountChanged {
                    from: current.clone(),
                    to: amount,
                }])
            }
            DealCommand::Win => {
                let (_, amount) = self.open()?;
                Ok(vec![DealEvent::DealWon {
                    amount: amount.clone(),
                }])
            }
            DealCommand::Lose { reason } => {
                self.open()?;
                Ok(vec![DealEvent::DealLost { reason }])
            }
        }
    }

    fn evolve(mut self, event: &DealEvent) -> Self {
        self.status = self.status.after(event);
        match event {
            DealEvent::DealOpened {
                deal_id,
                account_id,
                name,
                amount,
                owner,
                expected_close,
                stage,
            } => {
                self.id = Some(*deal_id);
                self.account_id = Some(*account_id);
                self.name = Some(name.clone());
                self.amount = Some(amount.clone());
                self.owner = owner.clone();
                self.expected_close = *expected_close;
                self.stage = Some(*stage);
            }
            DealEvent::DealStageChanged { to, .. } => self.stage = Some(*to),
            DealEvent::DealAmountChanged { to, .. } => self.amount = Some(to.clone()),
            DealEvent::DealWon { .. } | DealEvent::DealLost { .. } => {}
        }
        self
    }
}
