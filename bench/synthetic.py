"""Synthetic users and audience definitions for the benchmark (see bench/run.py).

Users are generated straight into `raw.users` by one DuckDB statement. Every random choice is a
hash of (user number, field number), so the same size always gives the same users, whatever the
thread count. Properties look like a Knock user object of a B2B SaaS product: typed top-level fields
(strings, integers, floats, booleans, ISO 8601 timestamps with `Z`), lists of strings, nested
custom objects two and three levels deep, some properties missing, some explicitly `null`, a few
numbers written as strings, and about 0.5% deleted users (tombstones the engine must ignore).

The 50 dynamic audiences use every kind of operator the issue asks for (equality, ordering,
`is_between`, `contains` on lists and text, `empty`/`exists`, relative and absolute timestamps,
`is_audience_member`), 1-3 segments and 1-4 conditions each; 17 of them read nested paths. Their
selectivities were tuned so that the memberships total about 7.8 per user (78M at 10M users).
"""

from __future__ import annotations

import json
from pathlib import Path

# The fixed evaluation time of the cold runs; generated timestamps are relative to it.
EVALUATION_TIME = "2026-11-01T12:00:00Z"
_NOW = "timestamp '2026-11-01 12:00:00'"

_MACROS = f"""
create or replace temp macro u(i, k) as (hash(i, k) % 1000000) / 1000000.0;
create or replace temp macro pick(values, i, k) as values[1 + (hash(i, k) % len(values))::integer];
create or replace temp macro iso(ts) as strftime(ts, '%Y-%m-%dT%H:%M:%SZ');
create or replace temp macro ago(seconds) as {_NOW} - to_seconds(cast(seconds as bigint));
"""

FIRST_NAMES = [
    "Ada",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kenji",
    "Lena",
    "Mateo",
    "Nora",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Uma",
    "Victor",
    "Wen",
    "Xavier",
    "Yara",
    "Zoe",
]
LAST_NAMES = [
    "Smith",
    "Garcia",
    "Müller",
    "Martin",
    "Rossi",
    "Kowalski",
    "Silva",
    "Tanaka",
    "Nguyen",
    "Johnson",
    "Dubois",
    "Jansen",
    "Andersson",
    "Kim",
    "Patel",
    "O'Brien",
    "Novak",
    "Costa",
]
CITIES = {
    "US": ["New York", "Austin", "Seattle", "Chicago"],
    "GB": ["London", "Leeds"],
    "DE": ["Berlin", "München"],
    "FR": ["Paris", "Lyon"],
    "ES": ["Madrid", "Sevilla"],
    "IT": ["Milano", "Roma"],
    "NL": ["Amsterdam", "Utrecht"],
    "BR": ["São Paulo", "Recife"],
    "CA": ["Toronto", "Montréal"],
    "IN": ["Bengaluru", "Pune"],
    "JP": ["Tokyo", "Osaka"],
    "SE": ["Stockholm"],
    "PL": ["Warszawa", "Kraków"],
}


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def users_sql(count: int) -> str:
    """One `insert into raw.users` statement generating `count` users (user_key 1..count)."""
    countries = list(CITIES)
    # Country by cumulative weight (percent): US 35, GB 10, DE 10, FR 8, ES 5, IT 5, NL 4, BR 5,
    # CA 5, IN 5, JP 4, SE 2, PL 2.
    weights = [35, 10, 10, 8, 5, 5, 4, 5, 5, 5, 4, 2, 2]
    bounds, total = [], 0
    for country, weight in zip(countries, weights, strict=True):
        total += weight
        bounds.append((total / 100, country))
    country_case = "case " + " ".join(f"when r_country < {b} then '{c}'" for b, c in bounds[:-1])
    country_case += f" else '{bounds[-1][1]}' end"
    city_case = (
        "case "
        + " ".join(
            f"when country = '{c}' then pick({_sql_list(v)}, i, 41)" for c, v in CITIES.items()
        )
        + " end"
    )
    return f"""
insert into raw.users
with base as (
    select
        i,
        u(i, 1) as r_plan, u(i, 2) as r_signup, u(i, 3) as r_seen, u(i, 4) as r_country,
        u(i, 5) as r_seats, u(i, 6) as r_mrr, u(i, 7) as r_nps, u(i, 8) as r_missing,
        u(i, 9) as r_trial, u(i, 10) as r_company, u(i, 11) as r_age, u(i, 12) as r_score,
        pick({_sql_list(FIRST_NAMES)}, i, 20) as first_name,
        pick({_sql_list(LAST_NAMES)}, i, 21) as last_name
    from range(1, {int(count)} + 1) as t(i)
),
derived as (
    select
        *,
        case when r_plan < 0.45 then 'free' when r_plan < 0.70 then 'starter'
             when r_plan < 0.90 then 'pro' when r_plan < 0.98 then 'enterprise' end as plan,
        {country_case} as country,
        r_signup * 1095 * 86400 as signup_age_s,
        case when u(i, 30) < 0.02 then '@lumenboard.example'
             else pick(['@gmail.com', '@gmail.com', '@outlook.com', '@yahoo.com', '@proton.me',
                        '@acme.io', '@globex.com', '@initech.example', '@hooli.example'], i, 31) end as domain
    from base
),
shaped as (
    select
        *,
        {city_case} as city,
        -- last seen: mostly recent, uniformly bounded by the signup date
        signup_age_s * r_seen * r_seen * r_seen as seen_ago_s,
        case plan when 'free' then 1
                  when 'enterprise' then 50 + floor(r_seats * 950)::integer
                  else 1 + floor(exp(r_seats * 4.6))::integer end as seats
    from derived
),
documents as (
    select
        i,
        r_missing,
        json_object(
            'name', first_name || ' ' || last_name,
            'email', case when r_missing < 0.03 then null
                          when r_missing < 0.04 then ''
                          else lower(first_name) || '.' || i || domain end,
            'phone_number', case when u(i, 32) < 0.25 then '+1555' || lpad((i % 10000000)::varchar, 7, '0') end,
            'locale', pick(['en-US', 'en-US', 'en-US', 'en-GB', 'de-DE', 'de-AT', 'fr-FR', 'es-ES',
                            'pt-BR', 'ja-JP', 'nl-NL', 'it-IT'], i, 33),
            'timezone', pick(['America/New_York', 'America/Chicago', 'America/Los_Angeles', 'Europe/London',
                              'Europe/Berlin', 'Europe/Paris', 'Asia/Tokyo', 'America/Sao_Paulo'], i, 34),
            'plan', plan,
            'seats', case when u(i, 35) < 0.05 then null else seats end,
            'mrr', case when u(i, 36) < 0.10 then null
                        when plan = 'free' then 0.0
                        when plan = 'starter' then round(10 + r_mrr * 90, 2)
                        when plan = 'pro' then round(100 + r_mrr * 1400, 2)
                        else round(1000 + r_mrr * 9000, 2) end,
            -- answered by 55%; 5% of the answers arrived as strings ("8")
            'nps_score', case when r_nps >= 0.55 then null
                              when u(i, 37) < 0.05 then to_json(floor(r_nps / 0.05)::integer::varchar)
                              else to_json(floor(r_nps / 0.05)::integer) end,
            'is_verified', case when u(i, 38) < 0.05 then null else u(i, 39) < 0.82 end,
            'marketing_opt_in', u(i, 40) < 0.5,
            'age', case when r_age < 0.3 then null else 18 + floor(u(i, 42) * 60)::integer end,
            'signed_up_at', iso(ago(signup_age_s)),
            'last_seen_at', case when r_missing > 0.92 then null else
                                 case when u(i, 43) < 0.1 then strftime(ago(seen_ago_s), '%Y-%m-%dT%H:%M:%S.%gZ')
                                      else iso(ago(seen_ago_s)) end end,
            'trial_ends_at', case when r_trial < 0.15 then iso(ago(86400 * 30 - r_trial / 0.15 * 86400 * 75)) end,
            'tags', case when u(i, 44) < 0.15 then null else
                [t for t in ['admin', 'owner', 'billing', 'developer', 'designer', 'marketing', 'sales',
                             'support', 'analyst', 'executive'] if u(i, t) < 0.14] end,
            'feature_flags', case when u(i, 45) < 0.12 then null else
                [f for f in ['beta_dashboard', 'beta_reports', 'beta_api', 'beta_optout', 'dark_mode',
                             'new_editor', 'ai_assist', 'sso'] if u(i, f) < 0.22] end,
            'address', case when r_missing between 0.05 and 0.15 then null else json_object(
                'city', city,
                'country', case when u(i, 48) < 0.03 then null else country end,
                'geo', json_object('lat', round(-40 + u(i, 49) * 100, 5), 'lon', round(-120 + u(i, 50) * 240, 5))
            ) end,
            'company', case when r_company < 0.3 then null else json_object(
                'name', pick(['Acme', 'Globex', 'Initech', 'Umbrella', 'Hooli', 'Stark', 'Wayne', 'Wonka',
                              'Tyrell', 'Cyberdyne', 'Soylent', 'Vandelay'], i, 51) || ' ' || (i % 5000),
                'industry', pick(['software', 'fintech', 'banking', 'insurance', 'retail', 'healthcare',
                                  'education', 'media', 'manufacturing', 'logistics'], i, 52),
                'size', case when u(i, 53) < 0.1 then null else floor(exp(u(i, 54) * 9.2))::integer end,
                'billing', case when plan = 'free' then null else json_object(
                    'tier', case when plan = 'enterprise' then 'scale' when u(i, 55) < 0.6 then 'basic' else 'growth' end,
                    'annual', u(i, 56) < 0.4,
                    'renewal_at', iso(ago(-u(i, 57) * 365 * 86400))
                ) end
            ) end,
            'preferences', json_object(
                'digest', case when u(i, 58) < 0.5 then 'weekly' when u(i, 58) < 0.8 then 'daily'
                               when u(i, 58) < 0.95 then 'never' end,
                'channels', json_object('email', u(i, 59) < 0.88, 'sms', u(i, 60) < 0.25, 'push', u(i, 61) < 0.5),
                'language', pick(['en', 'de', 'fr', 'es', 'pt', 'ja'], i, 62)
            ),
            'onboarding', case when u(i, 63) < 0.1 then null else json_object(
                'completed_steps', case when u(i, 64) < 0.05 then null else least(5, floor(u(i, 65) * 7))::integer end,
                'checklist', json_object('invited_team', u(i, 66) < 0.45, 'connected_data', u(i, 67) < 0.6)
            ) end,
            'stats', json_object(
                'logins_30d', floor(exp(u(i, 68) * 4))::integer - 1,
                'sessions', json_object(
                    'total', floor(exp(u(i, 69) * 7))::integer,
                    'last_device', pick(['web', 'web', 'ios', 'android', 'desktop'], i, 70)
                ),
                'lifetime_value', round(u(i, 71) * 5000, 2)
            ),
            'custom', json_object(
                'score', round(r_score * 100, 1),
                'segment', pick(['A', 'B', 'C', 'D', 'E'], i, 72),
                'interests', [t for t in ['ai', 'analytics', 'security', 'automation', 'design', 'data']
                              if u(i, t) < 0.2]
            )
        ) as full_document
    from shaped
)
select
    i::integer as user_key,
    'user_' || lpad(i::varchar, 9, '0') as user_id,
    -- `null` in a JSON merge patch removes the key: properties set to null above are missing ...
    json_merge_patch(
        -- ... except these, which some users hold as an explicit `null`
        case when r_missing < 0.4 then '{{"referral_code": null}}'
             when r_missing < 0.6 then '{{"referral_code": "REF' || (i % 9973) || '"}}'
             when r_missing > 0.98 then '{{"last_seen_at": null}}'
             else '{{}}' end,
        json_merge_patch('{{}}', full_document)
    ) as properties,
    'bench' as source_name,
    ago(400 * 86400 - u(i, 80) * 86400) as first_loaded_at,
    ago(86400 + u(i, 81) * 30 * 86400) as updated_at,
    case when u(i, 82) < 0.005 then ago(86400) end as deleted_at
from documents
"""


def generate_users(connection, count: int) -> None:
    from audiences.warehouse.schema import ensure_user_tables

    ensure_user_tables(connection)
    connection.execute("delete from raw.users")
    for statement in _MACROS.strip().split(";"):
        if statement.strip():
            connection.execute(statement)
    connection.execute(users_sql(count))
    connection.execute("checkpoint")


def touch_users_sql(round_number: int, modulus: int = 100, remainder: int = 7) -> str:
    """Update 1% of users (user_key % 100 = 7): new activity, plan and a nested change.

    `updated_at` is the evaluation time plus `round_number` quarter hours, later than any load, so
    incremental models see exactly these users as changed. Written the way the loader writes
    (audiences/users/store.py): the changed rows are deleted and inserted again. Several
    statements; the last one returns the number of users touched.
    """
    minutes = 15 * round_number
    return f"""
create or replace temp table touched_users as
select * replace (
    json_merge_patch(properties, json_object(
        'last_seen_at', strftime({_NOW} + to_minutes({minutes}), '%Y-%m-%dT%H:%M:%SZ'),
        'plan', case when (user_key // 100 + {round_number}) % 2 = 0 then 'pro' else 'starter' end,
        'stats', json_object('logins_30d', {round_number} + user_key % 40),
        'preferences', json_object('digest', case when {round_number} % 2 = 0 then 'daily' else 'weekly' end)
    ))::json as properties,
    {_NOW} + to_minutes({minutes}) as updated_at
)
from raw.users
where user_key % {modulus} = {remainder} and deleted_at is null;
delete from raw.users where user_key in (select user_key from touched_users);
insert into raw.users select * from touched_users;
"""


# ---------------------------------------------------------------------------------------------
# Audiences.


def _c(prop: str, operator: str, argument=None) -> dict:
    condition = {
        "property": prop if prop == "recipient" else f"recipient.{prop}",
        "operator": operator,
    }
    if argument is not None:
        condition["argument"] = argument
    return condition


def _audience(name: str, description: str, *segments: list[dict]) -> dict:
    return {
        "name": name,
        "type": "dynamic",
        "description": description,
        "segments": [{"conditions": list(conditions)} for conditions in segments],
    }


STAFF = "@lumenboard.example"
EU = '["AT", "BE", "DE", "DK", "ES", "FI", "FR", "IE", "IT", "NL", "PL", "PT", "SE"]'


def audiences() -> dict[str, dict]:
    """The 50 benchmark audiences, keyed by audience key."""
    a = {
        # --- top-level properties -------------------------------------------------------------
        "free-plan": _audience(
            "Free plan", "Everyone on the free plan.", [_c("plan", "equal_to", "free")]
        ),
        "paying-customers": _audience(
            "Paying customers",
            "Starter, Pro and Enterprise.",
            [
                _c("plan", "contains", '["starter", "pro", "enterprise"]'),
                _c("email", "not_contains", STAFF),
            ],
        ),
        "enterprise-accounts": _audience(
            "Enterprise", "Enterprise plan.", [_c("plan", "equal_to", "enterprise")]
        ),
        "pro-large-teams": _audience(
            "Pro, 20+ seats",
            "Pro accounts with 20 seats or more.",
            [_c("plan", "equal_to", "pro"), _c("seats", "greater_than_or_equal_to", "20")],
        ),
        "high-mrr": _audience(
            "High MRR", "More than $1,000 a month.", [_c("mrr", "greater_than", "1000")]
        ),
        "mid-mrr": _audience(
            "Mid MRR", "$100 to $1,000 a month.", [_c("mrr", "is_between", "[100, 1000]")]
        ),
        "verified-with-email": _audience(
            "Verified, with email",
            "Verified users with an email address who opted in.",
            [
                _c("is_verified", "equal_to", "true"),
                _c("email", "not_empty"),
                _c("marketing_opt_in", "equal_to", "true"),
            ],
        ),
        "unverified": _audience(
            "Not verified",
            "Not verified (or unknown).",
            [_c("is_verified", "not_equal_to", "true")],
        ),
        "nps-detractors": _audience(
            "NPS detractors", "Scored 3 or less.", [_c("nps_score", "less_than_or_equal_to", "3")]
        ),
        "nps-promoters": _audience(
            "NPS promoters",
            "Scored 9-10 and not at churn risk.",
            [
                _c("nps_score", "is_between", "[9, 10]"),
                _c("recipient", "is_not_audience_member", "churn-risk"),
                _c("email", "exists"),
            ],
        ),
        "churn-risk": _audience(
            "Churn risk",
            "Paying and unseen for 90 days, or paying and unhappy.",
            [
                _c("plan", "contains", '["starter", "pro", "enterprise"]'),
                _c("last_seen_at", "is_timestamp_before", "90 days ago"),
            ],
            [
                _c("plan", "contains", '["starter", "pro", "enterprise"]'),
                _c("nps_score", "less_than_or_equal_to", "3"),
            ],
        ),
        "active-last-3-days": _audience(
            "Active lately",
            "Seen in the last 3 days.",
            [_c("last_seen_at", "is_timestamp_on_or_after", "3 days ago")],
        ),
        "dormant-90-days": _audience(
            "Dormant",
            "Unseen for 180 days, or never seen and signed up before 2026.",
            [_c("last_seen_at", "is_timestamp_before", "180 days ago")],
            [
                _c("last_seen_at", "not_exists"),
                _c("signed_up_at", "is_timestamp_before", "2026-01-01T00:00:00Z"),
            ],
        ),
        "new-signups-30d": _audience(
            "New signups",
            "Signed up in the last 30 days, not staff.",
            [
                _c("signed_up_at", "is_timestamp_on_or_after", "30 days ago"),
                _c("email", "not_contains", STAFF),
            ],
        ),
        "signed-up-2025-h1": _audience(
            "2025 H1 cohort",
            "Signed up in the first half of 2025.",
            [
                _c(
                    "signed_up_at",
                    "is_timestamp_between",
                    '["2025-01-01T00:00:00Z", "2025-06-30T23:59:59Z"]',
                )
            ],
        ),
        "product-survey-sample": _audience(
            "Survey sample",
            "A stable 10% of verified users not opted out of marketing.",
            [
                _c("id", "is_in_random_cohort", "10"),
                _c("is_verified", "equal_to", "true"),
                _c("marketing_opt_in", "not_equal_to", "false"),
            ],
        ),
        "trial-ending-soon": _audience(
            "Trial ending soon",
            "Trial ends within 7 days.",
            [
                _c("trial_ends_at", "is_timestamp_on_or_after_now"),
                _c("trial_ends_at", "is_timestamp_before", "7 days from now"),
                _c("email", "not_empty"),
            ],
        ),
        "trial-expired-free": _audience(
            "Trial expired, free",
            "Trial over, back on free, seen at least once.",
            [
                _c("trial_ends_at", "is_timestamp_before_now"),
                _c("plan", "equal_to", "free"),
                _c("last_seen_at", "is_timestamp"),
            ],
        ),
        "admins": _audience("Admins", "Tagged admin.", [_c("tags", "contains", "admin")]),
        "billing-contacts": _audience(
            "Billing contacts",
            "Billing owners, or executives.",
            [_c("tags", "contains_all", '["billing", "owner"]')],
            [_c("tags", "contains", "executive")],
        ),
        "developers-without-sso": _audience(
            "Developers without SSO",
            "Developers on paying plans without SSO.",
            [
                _c("tags", "contains", "developer"),
                _c("feature_flags", "not_contains", "sso"),
                _c("plan", "not_equal_to", "free"),
            ],
        ),
        "beta-testers": _audience(
            "Beta testers",
            "Dashboard+reports beta, or API beta; not staff.",
            [
                _c("feature_flags", "contains_all", '["beta_dashboard", "beta_reports"]'),
                _c("email", "not_contains", STAFF),
            ],
            [_c("feature_flags", "contains", "beta_api"), _c("email", "not_contains", STAFF)],
        ),
        "no-feature-flags": _audience(
            "No feature flags", "No flag set.", [_c("feature_flags", "empty")]
        ),
        "gmail-users": _audience(
            "Gmail users", "Gmail addresses.", [_c("email", "contains", "@gmail.com")]
        ),
        "staff": _audience("Staff", "Lumenboard staff.", [_c("email", "contains", STAFF)]),
        "missing-email": _audience("Missing email", "No usable email.", [_c("email", "empty")]),
        "has-phone": _audience(
            "Has phone", "A phone number is known.", [_c("phone_number", "exists")]
        ),
        "german-speaking": _audience(
            "German speaking",
            "German locales.",
            [_c("locale", "contains", '["de-DE", "de-AT", "de-CH"]')],
        ),
        "uk-audience": _audience(
            "UK audience",
            "British English, or London time.",
            [_c("locale", "contains", "en-GB")],
            [_c("timezone", "equal_to", "Europe/London")],
        ),
        "young-adults": _audience("18-29", "Aged 18 to 29.", [_c("age", "is_between", "[18, 29]")]),
        "referred-users": _audience(
            "Referred", "Signed up with a referral code.", [_c("referral_code", "not_empty")]
        ),
        "marketing-reachable": _audience(
            "Marketing reachable",
            "Opted in, with email, active in the last 30 days.",
            [
                _c("marketing_opt_in", "equal_to", "true"),
                _c("email", "not_empty"),
                _c(
                    "last_seen_at",
                    "is_timestamp_on_or_after",
                    {"value": 30, "unit": "days", "direction": "ago"},
                ),
            ],
        ),
        "power-users": _audience(
            "Power users",
            "Owners of teams of 10+ seen in 3 days, or high MRR seen in 3 days.",
            [
                _c("tags", "contains", "owner"),
                _c("seats", "greater_than_or_equal_to", "10"),
                _c("last_seen_at", "is_timestamp_on_or_after", "3 days ago"),
            ],
            [
                _c("mrr", "greater_than", "2000"),
                _c("last_seen_at", "is_timestamp_on_or_after", "3 days ago"),
            ],
        ),
        # --- nested properties ----------------------------------------------------------------
        "beta-invite-candidates": _audience(
            "Beta invite candidates",
            "Power users not in the full beta and not opted out.",
            [
                _c("recipient", "is_audience_member", "power-users"),
                _c("feature_flags", "not_contains_all", '["beta_dashboard", "beta_reports"]'),
                _c("feature_flags", "not_contains", "beta_optout"),
                _c("preferences.channels.email", "equal_to", "true"),
            ],
        ),
        "eu-customers": _audience(
            "EU customers",
            "Paying customers billed in the EU.",
            [_c("address.country", "contains", EU), _c("plan", "not_equal_to", "free")],
        ),
        "us-users": _audience(
            "US users", "Address in the US.", [_c("address.country", "equal_to", "US")]
        ),
        "no-country": _audience(
            "Country unknown", "No address country.", [_c("address.country", "empty")]
        ),
        "growth-tier": _audience(
            "Growth tier",
            "Billing tier growth.",
            [_c("company.billing.tier", "equal_to", "growth")],
        ),
        "annual-renewal-soon": _audience(
            "Annual renewal soon",
            "Annual contracts renewing in the next 60 days.",
            [
                _c("company.billing.annual", "equal_to", "true"),
                _c("company.billing.renewal_at", "is_timestamp_on_or_after_now"),
                _c("company.billing.renewal_at", "is_timestamp_before", "60 days from now"),
            ],
        ),
        "large-companies": _audience(
            "Large companies",
            "1000+ employees.",
            [_c("company.size", "greater_than_or_equal_to", "1000")],
        ),
        "financial-services": _audience(
            "Financial services",
            "Fintech and banking.",
            [_c("company.industry", "contains", '["fintech", "banking"]')],
        ),
        "digest-never": _audience(
            "Digest off", "Turned digests off.", [_c("preferences.digest", "equal_to", "never")]
        ),
        "sms-reachable": _audience(
            "SMS reachable",
            "SMS opted in, with a phone number.",
            [_c("preferences.channels.sms", "equal_to", "true"), _c("phone_number", "exists")],
        ),
        "email-channel-off": _audience(
            "Email off",
            "Email channel turned off.",
            [_c("preferences.channels.email", "equal_to", "false")],
        ),
        "onboarding-incomplete": _audience(
            "Onboarding incomplete",
            "2026 H2 signups not fully onboarded.",
            [
                _c(
                    "signed_up_at",
                    "is_timestamp_between",
                    '["2026-07-01T00:00:00Z", "2026-12-31T23:59:59Z"]',
                ),
                _c("onboarding.completed_steps", "less_than", "5"),
            ],
            [
                _c(
                    "signed_up_at",
                    "is_timestamp_between",
                    '["2026-07-01T00:00:00Z", "2026-12-31T23:59:59Z"]',
                ),
                _c("onboarding.completed_steps", "empty"),
            ],
        ),
        "team-not-invited": _audience(
            "Team not invited",
            "Paying, onboarded 2+ steps, no team invited.",
            [
                _c("onboarding.checklist.invited_team", "equal_to", "false"),
                _c("onboarding.completed_steps", "greater_than_or_equal_to", "2"),
                _c("plan", "not_equal_to", "free"),
            ],
        ),
        "heavy-users": _audience(
            "Heavy users",
            "More than 30 logins in 30 days.",
            [_c("stats.logins_30d", "greater_than", "30")],
        ),
        "mobile-users": _audience(
            "Mobile users",
            "Last session on a phone, 20+ sessions.",
            [
                _c("stats.sessions.last_device", "contains", '["ios", "android"]'),
                _c("stats.sessions.total", "greater_than_or_equal_to", "20"),
            ],
        ),
        "ai-interested": _audience(
            "AI interested",
            "Interested in AI, or flagged into the AI assistant.",
            [_c("custom.interests", "contains_all", '["ai", "analytics"]')],
            [_c("feature_flags", "contains", "ai_assist"), _c("plan", "not_equal_to", "free")],
        ),
        "northern-high-value": _audience(
            "Northern, high value",
            "Above 45°N with a lifetime value over 2,500, or a score above 90.",
            [
                _c("address.geo.lat", "greater_than", "45"),
                _c("stats.lifetime_value", "greater_than", "2500"),
            ],
            [_c("custom.score", "greater_than", "90"), _c("address.geo.lat", "exists")],
            [
                _c("custom.segment", "equal_to", "A"),
                _c("address.geo.lat", "greater_than", "55"),
                _c("recipient", "is_audience_member", "paying-customers"),
            ],
        ),
    }
    assert len(a) == 50, len(a)
    return a


NESTED = {
    key
    for key, audience in audiences().items()
    if any(
        "." in c["property"].removeprefix("recipient.")
        for s in audience["segments"]
        for c in s["conditions"]
    )
}


def write_definitions(folder: Path) -> None:
    """Write the audiences as `<folder>/<key>/audience.json` (Knock CLI layout); remove others."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    wanted = audiences()
    for existing in folder.iterdir():
        if existing.is_dir() and existing.name not in wanted:
            shutil.rmtree(existing)
    for key, definition in wanted.items():
        target = folder / key / "audience.json"
        target.parent.mkdir(exist_ok=True)
        text = json.dumps(definition, indent=2, ensure_ascii=False) + "\n"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
