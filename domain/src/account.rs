//! The account: a customer company (`domain.md`, Account). Stream `account-{id}`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::{Label, Name, Tier};
use crate::{Aggregate, Command, DomainError, Event};

#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    Open {
        account_id: Uuid,
        name: Name,
        domain: Option<Label>,
        industry: Option<Label>,
        employees: Option<u64>,
        tier: Tier,
    },
    Rename {
        name: Name,
    },
    SetTier {
        tier: Tier,
    },
}

impl AccountCommand {
    /// The number of employees, refused when negative.
    pub fn employees(value: i64) -> Result<u64, DomainError> {
        u64::try_from(value).map_err(|_| DomainError::Negative { field: "employees" })
    }
}

impl Command for AccountCommand {
    fn name(&self) -> &'static str {
        match self {
            AccountCommand::Open { .. } => "OpenAccount",
            AccountCommand::Rename { .. } => "RenameAccount",
            AccountCommand::SetTier { .. } => "SetAccountTier",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccountEvent {
    AccountOpened {
        account_id: Uuid,
        name: Name,
        domain: Option<Label>,
        industry: Option<Label>,
        employees: Option<u64>,
        tier: Tier,
    },
    AccountRenamed {
        name: Name,
        previous_name: Name,
    },
    AccountTierChanged {
        tier: Tier,
        previous_tier: Tier,
    },
}

impl Event for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened { .. } => "AccountOpened",
            AccountEvent::AccountRenamed { .. } => "AccountRenamed",
            AccountEvent::AccountTierChanged { .. } => "AccountTierChanged",
        }
    }

    fn current_version(_event_type: &str) -> u32 {
        1
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: Option<Uuid>,
    pub name: Option<Name>,
    pub domain: Option<Label>,
    pub industry: Option<Label>,
    pub employees: Option<u64>,
    pub tier: Tier,
}

impl Account {
    fn existing_name(&self) -> Result<&Name, DomainError> {
        self.name.as_ref().ok_or(DomainError::AccountNotFound)
    }
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    const CATEGORY: &'static str = "account";
    const SNAPSHOT_VERSION: u32 = 1;

    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        match command {
            AccountCommand::Open {
                account_id,
                name,
                domain,
                industry,
                employees,
                tier,
            } => {
                if let Some(id) = self.id {
                    return Err(DomainError::AccountExists(id));
                }
                Ok(vec![AccountEvent::AccountOpened {
                    account_id,
                    name,
                    domain,
                    industry,
                    employees,
                    tier,
                }])
            }
            AccountCommand::Rename { name } => {
                let current = self.existing_name()?;
                if *current == name {
                    return Err(DomainError::SameName(name.to_string()));
                }
                Ok(vec![AccountEvent::AccountRenamed {
                    name,
                    previous_name: current.clone(),
                }])
            }
            AccountCommand::SetTier { tier } => {
                self.existing_name()?;
                if self.tier == tier {
                    return Err(DomainError::SameTier(tier.as_str()));
                }
                Ok(vec![AccountEvent::AccountTierChanged {
                    tier,
                    previous_tier: self.tier,
                }])
            }
        }
    }

    fn evolve(mut self, event: &AccountEvent) -> Self {
        match event {
            AccountEvent::AccountOpened {
                account_id,
                name,
                domain,
                industry,
                employees,
                tier,
            } => {
                self.id = Some(*account_id);
                self.name = Some(name.clone());
                self.domain = domain.clone();
                self.industry = industry.clone();
                self.employees = *employees;
                self.tier = *tier;
            }
            AccountEvent::AccountRenamed { name, .. } => self.name = Some(name.clone()),
            AccountEvent::AccountTierChanged { tier, .. } => self.tier = *tier,
        }
        self
    }
}
