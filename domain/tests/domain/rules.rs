//! Every rule of `domain.md` for leads, accounts and deals, accepted and refused, as
//! given (events) / when (command) / then (events or error).

use annals_domain::account::{Account, AccountCommand, AccountEvent};
use annals_domain::deal::{Deal, DealCommand, DealEvent};
use annals_domain::lead::{ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadEvent};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, RejectionKind};
use uuid::Uuid;

/// The harness: `given(events).when(command).then(events)` or `.then_err(error)`; the
/// routing and timer rules use it too.
pub(crate) struct Given<A: Aggregate>(A);

pub(crate) fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let events: Vec<A::Event> = events.into_iter().collect();
    Given(A::default().replay(&events))
}

pub(crate) struct When<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> Given<A> {
    pub(crate) fn when(self, command: A::Command) -> When<A> {
        let result = self.0.decide(command);
        When {
            state: self.0,
            result,
        }
    }
}

impl<A: Aggregate> When<A> {
    #[track_caller]
    pub(crate) fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected);
                self.state.replay(&events)
            }
            Err(error) => panic!("expected {expected:?}, got {error:?}"),
        }
    }

    #[track_caller]
    pub(crate) fn then_err(self, expected: DomainError) {
        match self.result {
            Err(error) => assert_eq!(error, expected),
            Ok(events) => panic!("expected {expected:?}, got {events:?}"),
        }
    }
}

pub(crate) fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn eur(minor: i64) -> Money {
    Money::parse("EUR", minor).unwrap()
}

// ----- Lead --------------------------------------------------------------------------

fn capture() -> LeadCommand {
    LeadCommand::Capture {
        lead_id: id(1),
        email: Email::parse("Ada@Example.com").unwrap(),
        name: PersonName::parse(" Ada Lovelace ").unwrap(),
        company: Some(Label::parse("Analytical Engines").unwrap()),
        source: Source::Web,
    }
}

fn captured() -> LeadEvent {
    LeadEvent::LeadCaptured {
        lead_id: id(1),
        email: Some(Email::parse("ada@example.com").unwrap()),
        name: Some(PersonName::parse("Ada Lovelace").unwrap()),
        company: Some(Label::parse("Analytical Engines").unwrap()),
        source: Source::Web,
    }
}

fn signal(kind: SignalKind) -> LeadCommand {
    LeadCommand::RecordSignal {
        kind,
        occurred_at: None,
    }
}

fn recorded(kind: SignalKind) -> LeadEvent {
    LeadEvent::SignalRecorded {
        kind,
        points: kind.points(),
        occurred_at: None,
    }
}

fn owner(name: &str) -> Owner {
    Owner::parse(name).unwrap()
}

fn assigned(to: &str, from: Option<&str>) -> LeadEvent {
    LeadEvent::LeadAssigned {
        owner: owner(to),
        previous_owner: from.map(owner),
    }
}

/// Events that bring a lead to `qualified` (score 50).
fn qualified_lead() -> Vec<LeadEvent> {
    vec![
        captured(),
        recorded(SignalKind::DemoRequest),
        recorded(SignalKind::DemoRequest),
        LeadEvent::LeadQualified { score: 50 },
    ]
}

fn convert(new_account: bool) -> LeadCommand {
    LeadCommand::Convert {
        deal_name: Name::parse("Engines for Acme").unwrap(),
        amount: eur(129_900),
        account: if new_account {
            ConversionAccount::New(id(20))
        } else {
            ConversionAccount::Existing(id(20))
        },
        deal: ConversionDeal::New(id(30)),
    }
}

fn disqualified() -> LeadEvent {
    LeadEvent::LeadDisqualified {
        reason: Reason::parse("no budget").unwrap(),
    }
}

#[test]
fn capture_records_a_new_lead_with_its_email_lower_cased() {
    let lead = given::<Lead>([]).when(capture()).then([captured()]);
    assert_eq!(lead.status.as_str(), "new");
    assert_eq!(lead.email.unwrap().as_str(), "ada@example.com");
}

#[test]
fn capture_of_an_existing_lead_is_a_conflict() {
    given::<Lead>([captured()])
        .when(capture())
        .then_err(DomainError::LeadExists(id(1)));
}

#[test]
fn capture_input_rules_are_enforced_by_the_values() {
    assert!(matches!(
        Email::parse("ada.example.com"),
        Err(DomainError::InvalidEmail(_))
    ));
    assert!(matches!(
        PersonName::parse(""),
        Err(DomainError::InvalidText { field: "name", .. })
    ));
    assert!(matches!(
        Source::parse("billboard"),
        Err(DomainError::UnknownValue {
            field: "source",
            ..
        })
    ));
    assert_eq!(
        DomainError::InvalidEmail("x".into()).kind(),
        RejectionKind::Invalid
    );
}

#[test]
fn capture_without_a_company_is_accepted() {
    let command = LeadCommand::Capture {
        lead_id: id(1),
        email: Email::parse("a@b.co").unwrap(),
        name: PersonName::parse("A").unwrap(),
        company: None,
        source: Source::Referral,
    };
    let lead = given::<Lead>([])
        .when(command)
        .then([LeadEvent::LeadCaptured {
            lead_id: id(1),
            email: Some(Email::parse("a@b.co").unwrap()),
            name: Some(PersonName::parse("A").unwrap()),
            company: None,
            source: Source::Referral,
        }]);
    assert_eq!(lead.company, None);
}

#[test]
fn record_signal_adds_its_points_to_the_score() {
    let lead = given::<Lead>([captured()])
        .when(signal(SignalKind::PricingPageView))
        .then([recorded(SignalKind::PricingPageView)]);
    assert_eq!(lead.score, 10);
}

#[test]
fn the_signal_that_reaches_fifty_qualifies_a_new_lead() {
    let lead = given::<Lead>([captured(), recorded(SignalKind::DemoRequest)])
        .when(signal(SignalKind::DemoRequest))
        .then([
            recorded(SignalKind::DemoRequest),
            LeadEvent::LeadQualified { score: 50 },
        ]);
    assert_eq!(lead.status.as_str(), "qualified");
}

#[test]
fn a_working_lead_qualifies_too_and_below_fifty_it_does_not() {
    let mut history = vec![captured(), assigned("bob", None)];
    history.extend((0..4).map(|_| recorded(SignalKind::PricingPageView)));
    given::<Lead>(history.clone())
        .when(signal(SignalKind::PricingPageView))
        .then([
            recorded(SignalKind::PricingPageView),
            LeadEvent::LeadQualified { score: 50 },
        ]);
    given::<Lead>(history)
        .when(signal(SignalKind::EmailClick))
        .then([recorded(SignalKind::EmailClick)]);
}

#[test]
fn a_qualified_lead_records_signals_but_is_not_qualified_again() {
    let lead = given::<Lead>(qualified_lead())
        .when(signal(SignalKind::DemoRequest))
        .then([recorded(SignalKind::DemoRequest)]);
    assert_eq!(lead.score, 75);
}

#[test]
fn record_signal_on_a_closed_lead_is_a_conflict() {
    given::<Lead>([captured(), disqualified()])
        .when(signal(SignalKind::PageView))
        .then_err(DomainError::LeadClosed {
            status: "disqualified",
        });
}

#[test]
fn commands_on_a_lead_that_does_not_exist_are_not_found() {
    given::<Lead>([])
        .when(signal(SignalKind::PageView))
        .then_err(DomainError::LeadNotFound);
    assert_eq!(DomainError::LeadNotFound.kind(), RejectionKind::NotFound);
}

#[test]
fn assign_makes_a_new_lead_working_and_names_the_previous_owner() {
    let lead = given::<Lead>([captured()])
        .when(LeadCommand::Assign {
            owner: owner("bob"),
        })
        .then([assigned("bob", None)]);
    assert_eq!(lead.status.as_str(), "working");
    let lead = given::<Lead>([captured(), assigned("bob", None)])
        .when(LeadCommand::Assign {
            owner: owner("carol"),
        })
        .then([assigned("carol", Some("bob"))]);
    assert_eq!(lead.owner, Some(owner("carol")));
}

#[test]
fn assigning_a_qualified_lead_keeps_it_qualified() {
    let lead = given::<Lead>(qualified_lead())
        .when(LeadCommand::Assign {
            owner: owner("bob"),
        })
        .then([assigned("bob", None)]);
    assert_eq!(lead.status.as_str(), "qualified");
}

#[test]
fn assigning_the_current_owner_again_is_a_conflict() {
    given::<Lead>([captured(), assigned("bob", None)])
        .when(LeadCommand::Assign {
            owner: owner("bob"),
        })
        .then_err(DomainError::AlreadyAssigned("bob".into()));
}

#[test]
fn assign_rules_on_the_owner_and_a_closed_lead() {
    assert!(Owner::parse(&"x".repeat(101)).is_err());
    given::<Lead>(
        qualified_lead()
            .into_iter()
            .chain([LeadEvent::LeadConverted {
                account_id: id(20),
                deal_id: id(30),
                deal_name: Name::parse("d").unwrap(),
                amount: eur(1),
                account_name: None,
            }]),
    )
    .when(LeadCommand::Assign {
        owner: owner("bob"),
    })
    .then_err(DomainError::LeadClosed {
        status: "converted",
    });
}

#[test]
fn disqualify_closes_an_open_lead() {
    let lead = given::<Lead>([captured()])
        .when(LeadCommand::Disqualify {
            reason: Reason::parse("no budget").unwrap(),
        })
        .then([disqualified()]);
    assert_eq!(lead.status.as_str(), "disqualified");
}

#[test]
fn disqualify_twice_is_a_conflict() {
    given::<Lead>([captured(), disqualified()])
        .when(LeadCommand::Disqualify {
            reason: Reason::parse("again").unwrap(),
        })
        .then_err(DomainError::LeadClosed {
            status: "disqualified",
        });
}

#[test]
fn erase_shreds_any_lead_not_erased_and_gives_its_email_back() {
    use annals_domain::{ClaimChange, Event};
    let key = Email::parse("ada@example.com").unwrap().claim_key();
    let histories = [
        vec![captured()],
        vec![captured(), assigned("grace", None)],
        qualified_lead(),
        vec![captured(), disqualified()],
    ];
    for history in histories {
        let before = history.iter().fold(Lead::default(), |l, e| l.evolve(e));
        let lead = given::<Lead>(history)
            .when(LeadCommand::Erase {})
            .then([LeadEvent::LeadErased {}]);
        assert_eq!(lead.status.as_str(), "erased");
        assert_eq!((lead.email, lead.name), (None, None), "forgotten");
        // The email's claim goes back, which only the state before knows.
        assert_eq!(
            before.claims(&LeadEvent::LeadErased {}),
            vec![ClaimChange::Release(key.clone())]
        );
    }
    assert!(LeadEvent::LeadErased {}.erases_subject());
    assert!(!captured().erases_subject());
    assert!(
        LeadEvent::LeadErased {}.claims().is_empty(),
        "nothing in the event"
    );
}

#[test]
fn erase_of_an_erased_or_unknown_lead_is_refused_and_an_erased_lead_takes_nothing() {
    let erased = vec![captured(), LeadEvent::LeadErased {}];
    given::<Lead>(erased.clone())
        .when(LeadCommand::Erase {})
        .then_err(DomainError::LeadClosed { status: "erased" });
    given::<Lead>([])
        .when(LeadCommand::Erase {})
        .then_err(DomainError::LeadNotFound);
    given::<Lead>(erased.clone())
        .when(signal(SignalKind::DemoRequest))
        .then_err(DomainError::LeadClosed { status: "erased" });
    given::<Lead>(erased)
        .when(LeadCommand::Assign {
            owner: owner("grace"),
        })
        .then_err(DomainError::LeadClosed { status: "erased" });
}

#[test]
fn a_converted_lead_may_be_erased_and_keeps_its_conversion() {
    let mut history = qualified_lead();
    history.push(LeadEvent::LeadConverted {
        account_id: id(20),
        deal_id: id(30),
        deal_name: Name::parse("Engines for Acme").unwrap(),
        amount: eur(129_900),
        account_name: Some(Name::parse("Analytical Engines").unwrap()),
    });
    let lead = given::<Lead>(history)
        .when(LeadCommand::Erase {})
        .then([LeadEvent::LeadErased {}]);
    assert_eq!(lead.converted_deal_id, Some(id(30)));
    assert_eq!(lead.email, None);
}

#[test]
fn a_capture_read_back_erased_has_no_email_and_takes_no_claim() {
    use annals_domain::Event;
    let erased = LeadEvent::LeadCaptured {
        lead_id: id(1),
        email: None,
        name: None,
        company: None,
        source: Source::Web,
    };
    assert!(erased.claims().is_empty());
    let lead = Lead::default().evolve(&erased);
    assert_eq!((lead.email, lead.name), (None, None));
    assert_eq!(
        LeadEvent::PERSONAL_FIELDS,
        &[("LeadCaptured", &["email", "name"][..])]
    );
}

#[test]
fn convert_a_qualified_lead_into_a_new_account_named_after_its_company() {
    let lead =
        given::<Lead>(qualified_lead())
            .when(convert(true))
            .then([LeadEvent::LeadConverted {
                account_id: id(20),
                deal_id: id(30),
                deal_name: Name::parse("Engines for Acme").unwrap(),
                amount: eur(129_900),
                account_name: Some(Name::parse("Analytical Engines").unwrap()),
            }]);
    assert_eq!(lead.status.as_str(), "converted");
    assert_eq!(lead.converted_deal_id, Some(id(30)));
}

#[test]
fn a_lead_without_a_company_converts_into_an_account_named_after_the_deal_never_the_person() {
    let without_company = LeadEvent::LeadCaptured {
        lead_id: id(1),
        email: Some(Email::parse("ada@example.com").unwrap()),
        name: Some(PersonName::parse("Ada Lovelace").unwrap()),
        company: None,
        source: Source::Web,
    };
    let mut history = qualified_lead();
    history[0] = without_company;
    given::<Lead>(history)
        .when(convert(true))
        .then([LeadEvent::LeadConverted {
            account_id: id(20),
            deal_id: id(30),
            deal_name: Name::parse("Engines for Acme").unwrap(),
            amount: eur(129_900),
            account_name: Some(Name::parse("Engines for Acme").unwrap()),
        }]);
}

#[test]
fn convert_into_an_account_that_does_not_exist_is_not_found() {
    let mut command = convert(false);
    if let LeadCommand::Convert { account, .. } = &mut command {
        *account = ConversionAccount::Unknown(account.id());
    }
    given::<Lead>(qualified_lead())
        .when(command)
        .then_err(DomainError::AccountNotFound);
}

#[test]
fn convert_into_a_deal_id_already_taken_is_a_conflict() {
    let mut command = convert(true);
    if let LeadCommand::Convert { deal, .. } = &mut command {
        *deal = ConversionDeal::Taken(deal.id());
    }
    given::<Lead>(qualified_lead())
        .when(command)
        .then_err(DomainError::DealExists(id(30)));
}

#[test]
fn convert_into_an_existing_account_opens_no_account() {
    given::<Lead>(qualified_lead())
        .when(convert(false))
        .then([LeadEvent::LeadConverted {
            account_id: id(20),
            deal_id: id(30),
            deal_name: Name::parse("Engines for Acme").unwrap(),
            amount: eur(129_900),
            account_name: None,
        }]);
}

#[test]
fn convert_a_lead_that_is_not_qualified_is_a_conflict() {
    given::<Lead>([captured(), assigned("bob", None)])
        .when(convert(true))
        .then_err(DomainError::LeadNotQualified { status: "working" });
    assert_eq!(
        DomainError::LeadNotQualified { status: "new" }.kind(),
        RejectionKind::Conflict
    );
}

#[test]
fn convert_with_a_negative_amount_is_invalid() {
    assert_eq!(
        Money::parse("EUR", -5),
        Err(DomainError::Negative { field: "amount" })
    );
}

// ----- Account -----------------------------------------------------------------------

fn open_account() -> AccountCommand {
    AccountCommand::Open {
        account_id: id(20),
        name: Name::parse("Acme").unwrap(),
        domain: Some(Label::parse("acme.example").unwrap()),
        industry: None,
        employees: Some(250),
        tier: Tier::Standard,
    }
}

fn account_opened() -> AccountEvent {
    AccountEvent::AccountOpened {
        account_id: id(20),
        name: Name::parse("Acme").unwrap(),
        domain: Some(Label::parse("acme.example").unwrap()),
        industry: None,
        employees: Some(250),
        tier: Tier::Standard,
    }
}

#[test]
fn open_account_records_it() {
    let account = given::<Account>([])
        .when(open_account())
        .then([account_opened()]);
    assert_eq!(account.tier, Tier::Standard);
}

#[test]
fn open_an_existing_account_is_a_conflict() {
    given::<Account>([account_opened()])
        .when(open_account())
        .then_err(DomainError::AccountExists(id(20)));
}

#[test]
fn open_account_input_rules() {
    assert_eq!(AccountCommand::employees(0), Ok(0));
    assert_eq!(
        AccountCommand::employees(-1),
        Err(DomainError::Negative { field: "employees" })
    );
    assert!(Name::parse(&"n".repeat(201)).is_err());
    assert!(matches!(
        Tier::parse("gold"),
        Err(DomainError::UnknownValue { field: "tier", .. })
    ));
}

#[test]
fn rename_account_to_another_name() {
    let account = given::<Account>([account_opened()])
        .when(AccountCommand::Rename {
            name: Name::parse("Acme Corp").unwrap(),
        })
        .then([AccountEvent::AccountRenamed {
            name: Name::parse("Acme Corp").unwrap(),
            previous_name: Name::parse("Acme").unwrap(),
        }]);
    assert_eq!(account.name.unwrap().as_str(), "Acme Corp");
}

#[test]
fn rename_to_the_same_name_is_a_conflict_and_a_missing_account_not_found() {
    given::<Account>([account_opened()])
        .when(AccountCommand::Rename {
            name: Name::parse("Acme").unwrap(),
        })
        .then_err(DomainError::SameName("Acme".into()));
    given::<Account>([])
        .when(AccountCommand::Rename {
            name: Name::parse("Acme").unwrap(),
        })
        .then_err(DomainError::AccountNotFound);
}

#[test]
fn set_tier_changes_it() {
    given::<Account>([account_opened()])
        .when(AccountCommand::SetTier { tier: Tier::Key })
        .then([AccountEvent::AccountTierChanged {
            tier: Tier::Key,
            previous_tier: Tier::Standard,
        }]);
}

#[test]
fn set_the_same_tier_is_a_conflict() {
    given::<Account>([account_opened()])
        .when(AccountCommand::SetTier {
            tier: Tier::Standard,
        })
        .then_err(DomainError::SameTier("standard"));
}

// ----- Deal --------------------------------------------------------------------------

fn open_deal(account_exists: bool) -> DealCommand {
    DealCommand::Open {
        deal_id: id(30),
        account_id: id(20),
        account_exists,
        name: Name::parse("Engines").unwrap(),
        amount: eur(100_000),
        owner: Some(owner("bob")),
        expected_close: None,
    }
}

fn deal_opened() -> DealEvent {
    DealEvent::DealOpened {
        deal_id: id(30),
        account_id: id(20),
        name: Name::parse("Engines").unwrap(),
        amount: eur(100_000),
        owner: Some(owner("bob")),
        expected_close: None,
        stage: Stage::Prospecting,
    }
}

fn won() -> DealEvent {
    DealEvent::DealWon {
        amount: eur(100_000),
    }
}

#[test]
fn open_deal_starts_at_prospecting() {
    let deal = given::<Deal>([])
        .when(open_deal(true))
        .then([deal_opened()]);
    assert_eq!(deal.stage, Some(Stage::Prospecting));
}

#[test]
fn open_deal_for_an_account_that_does_not_exist_is_not_found() {
    given::<Deal>([])
        .when(open_deal(false))
        .then_err(DomainError::AccountNotFound);
}

#[test]
fn open_an_existing_deal_is_a_conflict() {
    given::<Deal>([deal_opened()])
        .when(open_deal(true))
        .then_err(DomainError::DealExists(id(30)));
}

#[test]
fn advance_to_a_later_stage_skipping_is_allowed() {
    let deal = given::<Deal>([deal_opened()])
        .when(DealCommand::Advance {
            stage: Stage::Proposal,
        })
        .then([DealEvent::DealStageChanged {
            from: Stage::Prospecting,
            to: Stage::Proposal,
        }]);
    assert_eq!(deal.stage, Some(Stage::Proposal));
}

#[test]
fn advance_to_the_same_or_an_earlier_stage_is_a_conflict() {
    let history = [
        deal_opened(),
        DealEvent::DealStageChanged {
            from: Stage::Prospecting,
            to: Stage::Demo,
        },
    ];
    for stage in [Stage::Demo, Stage::Qualification] {
        given::<Deal>(history.clone())
            .when(DealCommand::Advance { stage })
            .then_err(DomainError::StageNotLater {
                from: "demo",
                to: stage.as_str(),
            });
    }
    assert_eq!(
        DomainError::StageNotLater {
            from: "demo",
            to: "demo"
        }
        .code(),
        "invalid-stage-transition"
    );
}

#[test]
fn change_amount_to_another_value_in_the_same_currency() {
    given::<Deal>([deal_opened()])
        .when(DealCommand::ChangeAmount {
            amount: eur(90_000),
        })
        .then([DealEvent::DealAmountChanged {
            from: eur(100_000),
            to: eur(90_000),
        }]);
}

#[test]
fn change_amount_in_another_currency_is_invalid_and_the_same_value_a_conflict() {
    given::<Deal>([deal_opened()])
        .when(DealCommand::ChangeAmount {
            amount: Money::parse("USD", 90_000).unwrap(),
        })
        .then_err(DomainError::CurrencyMismatch {
            deal: "EUR".into(),
            given: "USD".into(),
        });
    assert_eq!(
        DomainError::CurrencyMismatch {
            deal: "EUR".into(),
            given: "USD".into()
        }
        .kind(),
        RejectionKind::Invalid
    );
    given::<Deal>([deal_opened()])
        .when(DealCommand::ChangeAmount {
            amount: eur(100_000),
        })
        .then_err(DomainError::SameAmount("100000 EUR".into()));
}

#[test]
fn win_an_open_deal_at_its_amount() {
    let deal = given::<Deal>([deal_opened()])
        .when(DealCommand::Win)
        .then([won()]);
    assert_eq!(deal.status.as_str(), "won");
}

#[test]
fn a_closed_deal_never_changes() {
    let lost = DealEvent::DealLost {
        reason: Reason::parse("price").unwrap(),
    };
    for (closing, status) in [(won(), "won"), (lost, "lost")] {
        let history = [deal_opened(), closing];
        for command in [
            DealCommand::Win,
            DealCommand::Lose {
                reason: Reason::parse("x").unwrap(),
            },
            DealCommand::Advance {
                stage: Stage::Negotiation,
            },
            DealCommand::ChangeAmount { amount: eur(1) },
        ] {
            given::<Deal>(history.clone())
                .when(command)
                .then_err(DomainError::DealClosed { status });
        }
    }
}

#[test]
fn lose_an_open_deal_with_a_reason() {
    let deal = given::<Deal>([deal_opened()])
        .when(DealCommand::Lose {
            reason: Reason::parse("went with a competitor").unwrap(),
        })
        .then([DealEvent::DealLost {
            reason: Reason::parse("went with a competitor").unwrap(),
        }]);
    assert_eq!(deal.status.as_str(), "lost");
    assert!(Reason::parse("").is_err());
}

#[test]
fn commands_on_a_deal_that_does_not_exist_are_not_found() {
    given::<Deal>([])
        .when(DealCommand::Win)
        .then_err(DomainError::DealNotFound);
}

#[test]
fn a_captured_lead_takes_its_email_and_a_held_email_is_a_duplicate_naming_the_holder() {
    use annals_domain::{ClaimChange, Event};
    let key = Email::parse("ada@example.com").unwrap().claim_key();
    assert_eq!(captured().claims(), vec![ClaimChange::Take(key.clone())]);
    assert!(recorded(SignalKind::PageView).claims().is_empty());
    let holder = format!("lead-{}", id(7));
    assert_eq!(
        Lead::claim_held(&key, &holder),
        DomainError::DuplicateEmail { existing: id(7) }
    );
    assert_eq!(
        DomainError::DuplicateEmail { existing: id(7) }.code(),
        "duplicate-email"
    );
    assert_eq!(
        Deal::claim_held("k", "deal-x").kind(),
        RejectionKind::Conflict
    );
}

#[test]
fn a_conversion_opens_a_new_account_and_the_deal_or_only_the_deal() {
    use annals_domain::conversion::{account_to_open, deal_to_open};
    let new_account = LeadEvent::LeadConverted {
        account_id: id(20),
        deal_id: id(30),
        deal_name: Name::parse("Engines").unwrap(),
        amount: eur(5),
        account_name: Some(Name::parse("Acme").unwrap()),
    };
    assert_eq!(
        account_to_open(&new_account),
        Some(AccountCommand::Open {
            account_id: id(20),
            name: Name::parse("Acme").unwrap(),
            domain: None,
            industry: None,
            employees: None,
            tier: Tier::Standard,
        })
    );
    assert_eq!(
        deal_to_open(&new_account, true),
        Some(DealCommand::Open {
            deal_id: id(30),
            account_id: id(20),
            account_exists: true,
            name: Name::parse("Engines").unwrap(),
            amount: eur(5),
            owner: None,
            expected_close: None,
        })
    );
    let existing_account = LeadEvent::LeadConverted {
        account_id: id(20),
        deal_id: id(30),
        deal_name: Name::parse("Engines").unwrap(),
        amount: eur(5),
        account_name: None,
    };
    assert_eq!(account_to_open(&existing_account), None);
    assert!(deal_to_open(&existing_account, true).is_some());
    assert_eq!(account_to_open(&captured()), None);
    assert_eq!(deal_to_open(&captured(), true), None);
}

/// A status read back from its word is the status that wrote it (the read models store
/// the word); a word no status writes names none.
#[test]
fn every_status_word_names_its_status_and_no_other_word_does() {
    use annals_domain::deal::DealStatus;
    use annals_domain::lead::LeadStatus;
    let leads = std::iter::once(LeadStatus::Absent).chain(LeadStatus::CAPTURED.iter().copied());
    for status in leads {
        assert_eq!(LeadStatus::parse(status.as_str()), Some(status));
    }
    for status in [
        DealStatus::Absent,
        DealStatus::Open,
        DealStatus::Won,
        DealStatus::Lost,
    ] {
        assert_eq!(DealStatus::parse(status.as_str()), Some(status));
    }
    for word in ["", "Qualified", "qualified ", "closed"] {
        assert_eq!(LeadStatus::parse(word), None, "{word:?}");
        assert_eq!(DealStatus::parse(word), None, "{word:?}");
    }
}
