"""Generate the sample data a new user runs the product on.

Why this exists: the quick start, the demo pipeline and the end-to-end tests need a believable
warehouse to point at without anybody's real customers in it. This script writes that warehouse
from a fixed seed, so the files in `data/` are reproducible and reviewable: change a rule here, run
`python scripts/generate_sample_data.py`, and the diff shows exactly what moved. Running it twice
produces byte-for-byte identical files (no clock, no network, no unordered iteration).

What it writes (relative to the data directory, `data/` by default):

- `sources/users.csv`: about 3,000 users of "Lumenboard", a fictional B2B analytics SaaS, in the
  CSV format the loader reads (every cell a string, empty cell = unset, dotted columns are nested
  properties, a `properties` column holding a JSON object of extra custom properties). About 2-3%
  of the rows are deliberately messy (bad ids, unreadable `properties`, duplicate ids, odd numbers,
  an unreadable date, sparse rows) so the loader's error handling has something to catch.
- `sources/user_updates.parquet`: ~200 identify-style updates to existing users with real column
  types. Each row carries the user's full state after the update, and a null means "remove this
  property" (Knock's identify rule), so the rows read the same whether a loader merges or replaces.
  The updates happen during the week after the snapshot.
- `audiences/<key>/audience.json`: example audiences in the Knock CLI layout that, together, use
  every condition operator.

All times are relative to REFERENCE_TIME (2026-11-01T00:00:00Z), the moment the CSV snapshot was
taken. Audiences with relative times ("7 days ago") match the most users when evaluated near it.
Emails use the reserved `.example` top-level domain, so no message can reach a real inbox.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20261101
REFERENCE_TIME = datetime(2026, 11, 1, tzinfo=UTC)
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

CSV_COLUMNS = (
    "id",
    "name",
    "email",
    "phone_number",
    "avatar",
    "locale",
    "timezone",
    "plan",
    "seats",
    "mrr",
    "tags",
    "signed_up_at",
    "last_seen_at",
    "trial_ends_at",
    "is_verified",
    "address.city",
    "address.country",
    "company.name",
    "company.size",
    "properties",
)
CSV_ROW_COUNT = 3000
STAFF_COUNT = 24
HISTORY_DAYS = 3 * 365
RECENT_WINDOW_DAYS = 30
RECENT_SIGNUP_SHARE = 0.1
TRIAL_DAYS = 14
EXTENDED_TRIAL_DAYS = 30
UPDATE_ROW_COUNT = 200
REPEAT_UPDATE_COUNT = 15
UPDATE_WINDOW = timedelta(days=7)

PRODUCT_DOMAIN = "lumenboard.example"
PERSONAL_EMAIL_DOMAINS = ("mail.example", "inbox.example", "post.example")
AVATAR_URL = "https://avatars.lumenboard.example/u/{}.png"

PLAN_WEIGHTS = {"free": 45, "starter": 25, "pro": 20, "enterprise": 10}
NEW_USER_PLAN_WEIGHTS = {"free": 70, "starter": 20, "pro": 10, "enterprise": 0}
STARTER_SEAT_PRICE = 15.0
PRO_SEAT_PRICE = 39.0
ENTERPRISE_SEAT_PRICES = (18, 20, 22, 25, 28)
ANNUAL_DISCOUNT = 0.8
PLAN_UPGRADES = {"free": "starter", "starter": "pro", "pro": "enterprise"}
PLAN_DOWNGRADES = {"starter": "free", "pro": "starter"}

# Share of users who were last seen that long ago, by whether they pay. The windows are in days
# before REFERENCE_TIME; "never" users have no last_seen_at at all.
ENGAGEMENT_WINDOWS = {
    "active": (0.02, 3),
    "weekly": (3, 14),
    "monthly": (14, 30),
    "dormant": (30, 540),
}
PAID_ENGAGEMENT = {"active": 50, "weekly": 18, "monthly": 12, "dormant": 18, "never": 2}
FREE_ENGAGEMENT = {"active": 22, "weekly": 13, "monthly": 10, "dormant": 40, "never": 15}

ROLE_TAGS = ("admin", "owner", "billing", "developer", "marketing", "support", "analyst")
FEATURE_FLAG_WEIGHTS = {
    "dark_mode": 30,
    "beta_dashboard": 25,
    "ai_assistant": 18,
    "beta_reports": 12,
    "beta_api": 10,
    "new_editor": 10,
}
ALL_BETA_FLAGS = ["beta_api", "beta_dashboard", "beta_reports"]
DIGEST_WEIGHTS = {"daily": 20, "weekly": 45, "monthly": 15, "never": 20}
NPS_BANDS = {(0, 6): 25, (7, 8): 35, (9, 10): 40}
REFERRAL_SOURCES = ("google", "linkedin", "g2", "partner", "conference", "word_of_mouth", "podcast")
ONBOARDING_TOTAL_STEPS = 5
NAME_EMOJI = ("🚀", "✨", "🌈", "🎧", "🌻", "🐙", "☕")

COMPANY_SIZES_BY_PLAN = {
    "free": ("1-10", "11-50"),
    "starter": ("1-10", "11-50", "51-200"),
    "pro": ("11-50", "51-200", "201-1000"),
    "enterprise": ("201-1000", "1001-5000", "5000+"),
}
COMPANY_REUSE_PROBABILITY = {
    "1-10": 0.2,
    "11-50": 0.4,
    "51-200": 0.5,
    "201-1000": 0.6,
    "1001-5000": 0.7,
    "5000+": 0.75,
}
COMPANY_PREFIXES = (
    "Bright",
    "North",
    "Blue",
    "Iron",
    "Silver",
    "Quantum",
    "Harbor",
    "Cedar",
    "Maple",
    "Nimbus",
    "Atlas",
    "Copper",
    "Summit",
    "Pixel",
    "Vertex",
    "Orbit",
    "Granite",
    "Willow",
    "Falcon",
    "Tidal",
    "Ember",
    "Juniper",
)
COMPANY_SUFFIXES = (
    "loop",
    "works",
    "stack",
    "labs",
    "forge",
    "wave",
    "line",
    "field",
    "bridge",
    "point",
    "scale",
    "flow",
    "hub",
    "nest",
    "path",
    "yard",
)
COMPANY_INDUSTRIES = (
    "Analytics",
    "Data",
    "Software",
    "Systems",
    "Digital",
    "Cloud",
    "Logistics",
    "Health",
    "Media",
    "Commerce",
    "Robotics",
    "Foods",
    "Studio",
    "Energy",
)

# Messy rows: how many of each kind end up in users.csv. The id and properties kinds are the
# row-level problems the loader must reject; the others load but are odd.
MESSY_ROW_COUNTS = {
    "missing_id": 3,
    "blank_id": 3,
    "padded_id": 4,
    "long_id": 3,
    "newline_id": 2,
    "tab_id": 2,
    "invalid_json_properties": 5,
    "list_properties": 4,
    "leading_zero_seats": 8,
    "decimal_mrr": 5,
    "exponent_mrr": 5,
    "unreadable_signed_up_at": 4,
    "sparse": 12,
}
DUPLICATE_ROW_COUNT = 10
BLANK_IDS = (" ", "   ", "    ")
UNREADABLE_DATES = ("yesterday", "yesterday", "2025-02-30", "03/14/2025")
EXPONENT_MRR = ((1000.0, "1e3"), (2500.0, "2.5e3"), (1200.0, "1.2E+03"))
LIST_PROPERTIES = ('["beta_dashboard", "dark_mode"]', '[{"preferences": {"digest": "weekly"}}]')
ASCII_FOLDS = str.maketrans(
    {"ß": "ss", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "æ": "ae", "đ": "d", "'": "", "’": ""}
)


@dataclass(frozen=True)
class City:
    name: str
    timezone: str
    locale: str | None = None  # overrides the country's locale (French-speaking Canada)


@dataclass(frozen=True)
class Country:
    code: str
    weight: int
    locale: str
    phone_prefix: str
    phone_digits: int
    cities: tuple[City, ...]
    given_names: tuple  # plain strings, or (native, romanized) pairs for non-Latin scripts
    family_names: tuple
    legal_suffix: str = ""
    local_words: tuple[str, ...] = ()
    name_order: str = "given_first"  # "family_first" for Japanese, Chinese, Korean


def _cities(timezone_name: str, *names: str) -> tuple[City, ...]:
    return tuple(City(name, timezone_name) for name in names)


ENGLISH_GIVEN = (
    "James",
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Ava",
    "Ethan",
    "Sophia",
    "Mason",
    "Isabella",
    "Lucas",
    "Mia",
    "Harper",
    "Elijah",
    "Chloe",
    "Grace",
    "Daniel",
    "Zoe",
    "Marcus",
    "Aaliyah",
    "Jamal",
    "Carlos",
    "Sofia",
    "Wei",
    "Priya",
    "Hannah",
    "Tyler",
)
ENGLISH_FAMILY = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Nguyen",
    "Kim",
    "Patel",
    "O'Brien",
    "Anderson",
    "Thompson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
    "Walker",
    "Young",
    "Wright",
    "Hernández",
    "Chen",
    "Okafor",
    "Reyes",
)
GERMAN_GIVEN = (
    "Lukas",
    "Anna",
    "Jonas",
    "Lea",
    "Felix",
    "Sophie",
    "Maximilian",
    "Marie",
    "Jürgen",
    "Björn",
    "Jörg",
    "Käthe",
    "Paul",
    "Emilia",
    "Hannah",
    "Matthias",
)
GERMAN_FAMILY = (
    "Müller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Schäfer",
    "Groß",
    "Köhler",
    "Hoffmann",
    "Krüger",
    "Weiß",
    "Zimmermann",
)
SPANISH_GIVEN = (
    "Lucía",
    "Sofía",
    "Martín",
    "Hugo",
    "Alejandro",
    "María José",
    "Pablo",
    "Álvaro",
    "Jimena",
    "Begoña",
    "Íñigo",
    "Nuria",
    "Santiago",
    "Ximena",
    "Andrés",
)
SPANISH_FAMILY = (
    "García",
    "Fernández",
    "González",
    "Rodríguez",
    "López",
    "Martínez",
    "Sánchez",
    "Pérez",
    "Gómez",
    "Núñez",
    "Muñoz",
    "Hernández",
    "Ibáñez",
    "Peña",
)
PORTUGUESE_GIVEN = (
    "João",
    "Ana",
    "Gonçalo",
    "Inês",
    "Tomás",
    "Beatriz",
    "Luís",
    "Mariana",
    "Thiago",
    "Letícia",
    "Gabriel",
    "Júlia",
    "Caio",
    "Lívia",
)
PORTUGUESE_FAMILY = (
    "Silva",
    "Santos",
    "Oliveira",
    "Souza",
    "Pereira",
    "Costa",
    "Rodrigues",
    "Almeida",
    "Ferreira",
    "Gonçalves",
    "Araújo",
    "Conceição",
)

COUNTRIES = (
    Country(
        "US",
        28,
        "en-US",
        "+1",
        10,
        _cities("America/New_York", "New York", "Brooklyn", "Boston", "Atlanta")
        + _cities("America/Chicago", "Chicago", "Austin")
        + _cities("America/Denver", "Denver")
        + _cities("America/Los_Angeles", "San Francisco", "Seattle", "Los Angeles", "Portland"),
        ENGLISH_GIVEN,
        ENGLISH_FAMILY,
        "Inc.",
    ),
    Country(
        "CA",
        4,
        "en-CA",
        "+1",
        10,
        (
            City("Toronto", "America/Toronto"),
            City("Montréal", "America/Toronto", "fr-CA"),
            City("Québec", "America/Toronto", "fr-CA"),
            City("Vancouver", "America/Vancouver"),
            City("Calgary", "America/Edmonton"),
        ),
        (*ENGLISH_GIVEN, "Élodie", "François", "Gabrielle", "Étienne", "Amélie"),
        (*ENGLISH_FAMILY, "Tremblay", "Gagnon", "Côté", "Bouchard", "Gauthier"),
        "Inc.",
    ),
    Country(
        "GB",
        7,
        "en-GB",
        "+44",
        10,
        _cities("Europe/London", "London", "Manchester", "Edinburgh", "Bristol", "Leeds"),
        (
            "Oliver",
            "Amelia",
            "George",
            "Isla",
            "Harry",
            "Freya",
            "Charlie",
            "Poppy",
            "Alfie",
            "Evie",
            "Siobhan",
            "Rhys",
            "Aisha",
            "Callum",
        ),
        (
            "Taylor",
            "Davies",
            "Evans",
            "Wilson",
            "Thomas",
            "Roberts",
            "Hughes",
            "Robinson",
            "Khan",
            "Patel",
            "MacLeod",
            "Ahmed",
        ),
        "Ltd",
    ),
    Country(
        "IE",
        1,
        "en-IE",
        "+353",
        9,
        _cities("Europe/Dublin", "Dublin", "Cork", "Galway"),
        ("Aoife", "Seán", "Niamh", "Ciarán", "Saoirse", "Oisín", "Róisín", "Pádraig"),
        ("Murphy", "Kelly", "O'Sullivan", "Walsh", "Byrne", "Ryan", "O'Connor", "McCarthy"),
        "Ltd",
    ),
    Country(
        "DE",
        8,
        "de-DE",
        "+49",
        11,
        _cities(
            "Europe/Berlin",
            "Berlin",
            "München",
            "Köln",
            "Hamburg",
            "Düsseldorf",
            "Frankfurt am Main",
            "Leipzig",
        ),
        GERMAN_GIVEN,
        GERMAN_FAMILY,
        "GmbH",
        ("Nordlicht", "Bergblick", "Weißwald", "Flussmühle"),
    ),
    Country(
        "AT",
        1,
        "de-AT",
        "+43",
        10,
        _cities("Europe/Vienna", "Wien", "Graz", "Salzburg"),
        GERMAN_GIVEN,
        (*GERMAN_FAMILY, "Gruber", "Huber", "Pichler"),
        "GmbH",
        ("Alpenglühen",),
    ),
    Country(
        "FR",
        6,
        "fr-FR",
        "+33",
        9,
        _cities("Europe/Paris", "Paris", "Lyon", "Marseille", "Toulouse", "Nantes", "Lille"),
        (
            "Léa",
            "Chloé",
            "Hugo",
            "Louis",
            "Inès",
            "Zoé",
            "Théo",
            "Camille",
            "Jérôme",
            "Maëlle",
            "François",
            "Gaëlle",
            "Noémie",
            "Benoît",
        ),
        (
            "Martin",
            "Bernard",
            "Dubois",
            "Thomas",
            "Robert",
            "Richard",
            "Petit",
            "Durand",
            "Leroy",
            "Moreau",
            "Lefèvre",
            "Girard",
            "Mercier",
            "Faure",
        ),
        "SAS",
        ("Étoile", "Lumière", "Côte", "Mistral"),
    ),
    Country(
        "ES",
        4,
        "es-ES",
        "+34",
        9,
        _cities("Europe/Madrid", "Madrid", "Barcelona", "Sevilla", "Málaga", "València", "Bilbao"),
        SPANISH_GIVEN,
        SPANISH_FAMILY,
        "S.L.",
        ("Sol", "Brisa", "Olivo", "Alborada"),
    ),
    Country(
        "IT",
        3,
        "it-IT",
        "+39",
        10,
        _cities("Europe/Rome", "Roma", "Milano", "Torino", "Napoli", "Bologna"),
        (
            "Giulia",
            "Alessandro",
            "Francesca",
            "Lorenzo",
            "Chiara",
            "Matteo",
            "Sofia",
            "Niccolò",
            "Beatrice",
            "Gabriele",
        ),
        (
            "Rossi",
            "Russo",
            "Ferrari",
            "Esposito",
            "Bianchi",
            "Romano",
            "Colombo",
            "Ricci",
            "Marino",
            "Greco",
            "De Luca",
            "D'Angelo",
        ),
        "S.r.l.",
        ("Aurora", "Vento", "Stella"),
    ),
    Country(
        "NL",
        3,
        "nl-NL",
        "+31",
        9,
        _cities("Europe/Amsterdam", "Amsterdam", "Rotterdam", "Utrecht", "Den Haag", "Eindhoven"),
        ("Daan", "Emma", "Sem", "Julia", "Lotte", "Bram", "Sanne", "Thijs", "Fleur", "Joost"),
        (
            "de Jong",
            "Jansen",
            "de Vries",
            "van den Berg",
            "van Dijk",
            "Bakker",
            "Visser",
            "Smit",
            "Meijer",
            "de Boer",
            "van der Meer",
        ),
        "B.V.",
        ("Polder", "Tulp", "Duin"),
    ),
    Country(
        "SE",
        2,
        "sv-SE",
        "+46",
        9,
        _cities("Europe/Stockholm", "Stockholm", "Göteborg", "Malmö", "Uppsala"),
        ("Elsa", "Astrid", "Björn", "Maja", "Linnéa", "Oskar", "Saga", "Hugo", "Åsa", "Göran"),
        (
            "Andersson",
            "Johansson",
            "Karlsson",
            "Nilsson",
            "Eriksson",
            "Larsson",
            "Öberg",
            "Åberg",
            "Lindqvist",
            "Sjöberg",
        ),
        "AB",
        ("Fjäll", "Ljus", "Norrsken"),
    ),
    Country(
        "PL",
        2,
        "pl-PL",
        "+48",
        9,
        _cities("Europe/Warsaw", "Warszawa", "Kraków", "Łódź", "Wrocław", "Gdańsk"),
        (
            "Zofia",
            "Jakub",
            "Łucja",
            "Wojciech",
            "Agnieszka",
            "Paweł",
            "Małgorzata",
            "Michał",
            "Katarzyna",
            "Grzegorz",
        ),
        (
            "Nowak",
            "Wiśniewski",
            "Wójcik",
            "Kowalczyk",
            "Kamiński",
            "Lewandowski",
            "Zieliński",
            "Szymański",
            "Dąbrowski",
        ),
        "sp. z o.o.",
        ("Wisła", "Bursztyn", "Sokół"),
    ),
    Country(
        "PT",
        1,
        "pt-PT",
        "+351",
        9,
        _cities("Europe/Lisbon", "Lisboa", "Porto", "Coimbra"),
        PORTUGUESE_GIVEN,
        PORTUGUESE_FAMILY,
        "Lda.",
        ("Maré", "Farol"),
    ),
    Country(
        "UA",
        2,
        "uk-UA",
        "+380",
        9,
        _cities("Europe/Kyiv", "Київ", "Львів", "Одеса", "Харків", "Дніпро"),
        (
            ("Олена", "Olena"),
            ("Андрій", "Andrii"),
            ("Оксана", "Oksana"),
            ("Дмитро", "Dmytro"),
            ("Ірина", "Iryna"),
            ("Тарас", "Taras"),
            ("Наталія", "Nataliia"),
            ("Богдан", "Bohdan"),
            ("Юлія", "Yuliia"),
            ("Максим", "Maksym"),
        ),
        (
            ("Коваленко", "Kovalenko"),
            ("Шевченко", "Shevchenko"),
            ("Бондаренко", "Bondarenko"),
            ("Ткаченко", "Tkachenko"),
            ("Кравченко", "Kravchenko"),
            ("Олійник", "Oliinyk"),
            ("Мельник", "Melnyk"),
            ("Бойко", "Boiko"),
        ),
    ),
    Country(
        "JP",
        6,
        "ja-JP",
        "+81",
        10,
        _cities("Asia/Tokyo", "東京", "大阪", "京都", "横浜", "福岡", "札幌"),
        (
            ("花子", "Hanako"),
            ("太郎", "Taro"),
            ("さくら", "Sakura"),
            ("健太", "Kenta"),
            ("美咲", "Misaki"),
            ("翔太", "Shota"),
            ("陽菜", "Hina"),
            ("大輔", "Daisuke"),
            ("結衣", "Yui"),
            ("蓮", "Ren"),
        ),
        (
            ("佐藤", "Sato"),
            ("鈴木", "Suzuki"),
            ("高橋", "Takahashi"),
            ("田中", "Tanaka"),
            ("伊藤", "Ito"),
            ("渡辺", "Watanabe"),
            ("山本", "Yamamoto"),
            ("中村", "Nakamura"),
            ("小林", "Kobayashi"),
            ("加藤", "Kato"),
        ),
        name_order="family_first",
    ),
    Country(
        "KR",
        2,
        "ko-KR",
        "+82",
        10,
        _cities("Asia/Seoul", "서울", "부산", "인천", "대전"),
        (
            ("민준", "Minjun"),
            ("서연", "Seoyeon"),
            ("지훈", "Jihoon"),
            ("하은", "Haeun"),
            ("도윤", "Doyoon"),
            ("수아", "Sua"),
            ("예준", "Yejun"),
            ("지민", "Jimin"),
        ),
        (
            ("김", "Kim"),
            ("이", "Lee"),
            ("박", "Park"),
            ("최", "Choi"),
            ("정", "Jung"),
            ("강", "Kang"),
            ("조", "Cho"),
            ("윤", "Yoon"),
        ),
        name_order="family_first",
    ),
    Country(
        "CN",
        2,
        "zh-CN",
        "+86",
        11,
        _cities("Asia/Shanghai", "上海", "北京", "深圳", "杭州", "成都"),
        (
            ("伟", "Wei"),
            ("芳", "Fang"),
            ("娜", "Na"),
            ("敏", "Min"),
            ("静", "Jing"),
            ("磊", "Lei"),
            ("洋", "Yang"),
            ("婷", "Ting"),
            ("浩然", "Haoran"),
            ("子涵", "Zihan"),
        ),
        (
            ("王", "Wang"),
            ("李", "Li"),
            ("张", "Zhang"),
            ("刘", "Liu"),
            ("陈", "Chen"),
            ("杨", "Yang"),
            ("黄", "Huang"),
            ("赵", "Zhao"),
            ("吴", "Wu"),
            ("周", "Zhou"),
        ),
        name_order="family_first",
    ),
    Country(
        "IN",
        7,
        "en-IN",
        "+91",
        10,
        _cities("Asia/Kolkata", "Bengaluru", "Mumbai", "Pune", "Hyderabad", "Chennai", "New Delhi"),
        (
            "Aarav",
            "Priya",
            "Rohan",
            "Ananya",
            "Vihaan",
            "Diya",
            "Arjun",
            "Isha",
            "Karthik",
            "Sneha",
            "Aditya",
            "Meera",
            "Siddharth",
            "Lakshmi",
        ),
        (
            "Sharma",
            "Patel",
            "Gupta",
            "Iyer",
            "Reddy",
            "Nair",
            "Singh",
            "Kumar",
            "Rao",
            "Menon",
            "Banerjee",
            "Desai",
            "Chatterjee",
        ),
        "Pvt. Ltd.",
    ),
    Country(
        "BR",
        5,
        "pt-BR",
        "+55",
        11,
        _cities(
            "America/Sao_Paulo",
            "São Paulo",
            "Rio de Janeiro",
            "Belo Horizonte",
            "Curitiba",
            "Florianópolis",
            "Porto Alegre",
        ),
        PORTUGUESE_GIVEN,
        PORTUGUESE_FAMILY,
        "Ltda.",
        ("Ipê", "Jangada", "Araucária"),
    ),
    Country(
        "MX",
        3,
        "es-MX",
        "+52",
        10,
        _cities("America/Mexico_City", "Ciudad de México", "Guadalajara", "Monterrey", "Puebla"),
        SPANISH_GIVEN,
        SPANISH_FAMILY,
        "S.A. de C.V.",
        ("Nopal", "Colibrí", "Jacaranda"),
    ),
    Country(
        "AU",
        3,
        "en-AU",
        "+61",
        9,
        (
            City("Sydney", "Australia/Sydney"),
            City("Melbourne", "Australia/Melbourne"),
            City("Brisbane", "Australia/Brisbane"),
            City("Perth", "Australia/Perth"),
        ),
        (*ENGLISH_GIVEN, "Matilda", "Lachlan"),
        (*ENGLISH_FAMILY, "Mitchell"),
        "Pty Ltd",
    ),
    Country(
        "NG",
        1,
        "en-NG",
        "+234",
        10,
        _cities("Africa/Lagos", "Lagos", "Abuja"),
        ("Chinedu", "Ngozi", "Oluwaseun", "Adaeze", "Emeka", "Funmilayo", "Tunde", "Chiamaka"),
        ("Okafor", "Adeyemi", "Okonkwo", "Balogun", "Eze", "Nwosu", "Adebayo"),
        "Ltd",
    ),
)
COUNTRY_BY_CODE = {country.code: country for country in COUNTRIES}
STAFF_COUNTRIES = ("US", "US", "GB", "DE", "FR", "CA")

# Company names written in the local script, as (prefix, word, kind, legal) pieces, each a
# (native, romanized) pair; the romanized form becomes the email domain.
NATIVE_COMPANY_PARTS = {
    "JP": (
        "株式会社",
        (
            ("サクラ", "sakura"),
            ("ミライ", "mirai"),
            ("ヒカリ", "hikari"),
            ("アオゾラ", "aozora"),
            ("ツバサ", "tsubasa"),
        ),
        (
            ("テック", "tech"),
            ("ソリューションズ", "solutions"),
            ("システムズ", "systems"),
            ("ラボ", "labs"),
        ),
    ),
    "CN": (
        "",
        (
            ("星辰", "xingchen"),
            ("云帆", "yunfan"),
            ("海澜", "hailan"),
            ("智联", "zhilian"),
            ("锦程", "jincheng"),
        ),
        (("科技有限公司", "tech"), ("网络科技有限公司", "net"), ("信息技术有限公司", "it")),
    ),
    "KR": (
        "주식회사 ",
        (("한빛", "hanbit"), ("누리", "nuri"), ("별빛", "byeolbit"), ("미르", "mir")),
        (("테크", "tech"), ("소프트", "soft"), ("랩스", "labs")),
    ),
    "UA": (
        "ТОВ «",
        (("Світанок", "svitanok"), ("Горизонт", "horyzont"), ("Карпати", "karpaty")),
        ((" Софт»", "soft"), (" Технології»", "tech"), (" Лабс»", "labs")),
    ),
}

# Example audiences (Knock CLI layout). Arguments are strings, as Knock stores them.
EU_COUNTRY_CODES = ["AT", "BE", "DE", "DK", "ES", "FI", "FR", "IE", "IT", "NL", "PL", "PT", "SE"]
STAFF_EMAIL_DOMAIN = "@" + PRODUCT_DOMAIN
PAID_PLANS = ["starter", "pro", "enterprise"]


def condition(path: str, operator: str, argument: str | None = None) -> dict:
    """One audience condition on `recipient.<path>`; `argument` is left out when it is None."""
    result = {"property": f"recipient.{path}" if path else "recipient", "operator": operator}
    if argument is not None:
        result["argument"] = argument
    return result


def as_argument(value) -> str:
    """A list argument as Knock stores it: JSON text inside a string."""
    return json.dumps(value, ensure_ascii=False)


def not_staff() -> dict:
    return condition("email", "not_contains", STAFF_EMAIL_DOMAIN)


DYNAMIC_AUDIENCES = {
    "trial-ending-soon": (
        "Trial ending soon",
        "Users whose free trial of Pro ends within the next 7 days. Feeds the trial-conversion "
        "email sequence, so it needs an email address.",
        [
            [
                condition("trial_ends_at", "is_timestamp_on_or_after_now"),
                condition("trial_ends_at", "is_timestamp_before", "7 days from now"),
                condition("email", "not_empty"),
            ]
        ],
    ),
    "trial-expired-unconverted": (
        "Trial expired, not converted",
        "Users whose trial has ended and who are back on the Free plan, and who logged in at "
        "least once. Target of the win-back offer.",
        [
            [
                condition("trial_ends_at", "is_timestamp_before_now"),
                condition("plan", "equal_to", "free"),
                condition("last_seen_at", "is_timestamp"),
            ]
        ],
    ),
    "new-signups-this-week": (
        "New signups this week",
        "Everyone who signed up in the last 7 days, excluding Lumenboard staff accounts. "
        "Receives the welcome series.",
        [[condition("signed_up_at", "is_timestamp_on_or_after", "7 days ago"), not_staff()]],
    ),
    "onboarding-incomplete": (
        "Onboarding incomplete (H2 2026 cohort)",
        "Users who signed up in the second half of 2026 and have not finished the five onboarding "
        "steps, or never started them. Receives onboarding nudges from customer success.",
        [
            [
                condition(
                    "signed_up_at",
                    "is_timestamp_between",
                    as_argument(["2026-07-01T00:00:00Z", "2026-12-31T23:59:59Z"]),
                ),
                condition("onboarding.completed_steps", "less_than", "5"),
            ],
            [
                condition(
                    "signed_up_at",
                    "is_timestamp_between",
                    as_argument(["2026-07-01T00:00:00Z", "2026-12-31T23:59:59Z"]),
                ),
                condition("onboarding.completed_steps", "empty"),
            ],
        ],
    ),
    "power-users": (
        "Power users",
        "Highly engaged accounts: seen in the last 3 days and either a fully onboarded team of 10+ "
        "seats or an account paying more than $2,000 a month. Used for case-study and "
        "advisory-board invitations.",
        [
            [
                condition("onboarding.completed_steps", "equal_to", "5"),
                condition("seats", "greater_than_or_equal_to", "10"),
                condition("last_seen_at", "is_timestamp_on_or_after", "3 days ago"),
            ],
            [
                condition("mrr", "greater_than", "2000"),
                condition("last_seen_at", "is_timestamp_on_or_after", "3 days ago"),
            ],
        ],
    ),
    "churn-risk": (
        "Churn risk",
        "Paying customers who have not been seen for 30 days or who gave an NPS score of 6 or "
        "less. Routed to their account manager for a check-in.",
        [
            [
                condition("plan", "contains", as_argument(PAID_PLANS)),
                condition("last_seen_at", "is_timestamp_before", "30 days ago"),
            ],
            [
                condition("plan", "contains", as_argument(PAID_PLANS)),
                condition("nps_score", "less_than_or_equal_to", "6"),
            ],
        ],
    ),
    "eu-customers": (
        "EU customers",
        "Paying customers whose billing address is in the European Union. Receives GDPR and "
        "EU data-residency announcements.",
        [
            [
                condition("address.country", "contains", as_argument(EU_COUNTRY_CODES)),
                condition("plan", "not_equal_to", "free"),
            ]
        ],
    ),
    "enterprise-admins": (
        "Enterprise admins",
        "Administrators of Enterprise accounts (not Lumenboard staff). Receives security, SSO "
        "and contract notices.",
        [
            [
                condition("plan", "equal_to", "enterprise"),
                condition("tags", "contains", "admin"),
                not_staff(),
            ]
        ],
    ),
    "beta-testers": (
        "Beta testers",
        "Customers enrolled in both the dashboard and reports betas, or in the API beta. "
        "Receives beta release notes and feedback surveys. Staff are excluded.",
        [
            [
                condition(
                    "feature_flags", "contains_all", as_argument(["beta_dashboard", "beta_reports"])
                ),
                not_staff(),
            ],
            [condition("feature_flags", "contains", "beta_api"), not_staff()],
        ],
    ),
    "beta-invite-candidates": (
        "Beta invite candidates",
        "Power users who are not yet in the full dashboard+reports beta and have not opted out "
        "of betas. Product invites them to the next beta wave.",
        [
            [
                condition("", "is_audience_member", "power-users"),
                condition(
                    "feature_flags",
                    "not_contains_all",
                    as_argument(["beta_dashboard", "beta_reports"]),
                ),
                condition("feature_flags", "not_contains", "beta_optout"),
            ]
        ],
    ),
    "dormant-free-users": (
        "Dormant free users",
        "Free-plan users who have not been seen since before August 2026 (90+ days) or who "
        "never logged in after signing up before September 2026. Receives the re-engagement "
        "campaign.",
        [
            [
                condition("plan", "equal_to", "free"),
                condition("last_seen_at", "is_timestamp_before", "90 days ago"),
            ],
            [
                condition("plan", "equal_to", "free"),
                condition("last_seen_at", "not_exists"),
                condition("signed_up_at", "is_timestamp_before", "2026-09-01T00:00:00Z"),
            ],
        ],
    ),
    "nps-promoters": (
        "NPS promoters",
        "Users who scored us 9 or 10 and are not at churn risk. Asked for a G2 review or a "
        "referral.",
        [
            [
                condition("nps_score", "is_between", "[9, 10]"),
                condition("", "is_not_audience_member", "churn-risk"),
                condition("email", "exists"),
            ]
        ],
    ),
    "product-survey-sample": (
        "Product survey sample",
        "A stable 10% random sample of verified users who have not turned digests off. Receives "
        "the quarterly product survey.",
        [
            [
                condition("id", "is_in_random_cohort", "10"),
                condition("is_verified", "equal_to", "true"),
                condition("preferences.digest", "not_equal_to", "never"),
            ]
        ],
    ),
}
STATIC_AUDIENCES = {
    "vip-customers": (
        "VIP customers",
        "Hand-picked key accounts, maintained by the account team. Members are added and removed "
        "through the API, not by conditions.",
    ),
}


@dataclass
class Company:
    name: str
    domain: str
    size: str


@dataclass
class User:
    """One user as the generator knows it, with real types; CSV text is rendered from this."""

    id: str
    name: str | None
    romanized_name: tuple[str, str]
    email: str | None
    phone_number: str | None
    avatar: str | None
    locale: str | None
    timezone: str | None
    plan: str
    seats: int | None
    mrr: float | None
    tags: list[str] | None
    signed_up_at: datetime
    last_seen_at: datetime | None
    trial_ends_at: datetime | None
    is_verified: bool | None
    city: str | None
    country: str | None
    company: Company | None
    properties: dict = field(default_factory=dict)
    timestamp_style: str = "utc"
    is_staff: bool = False
    csv_overrides: dict[str, str] = field(default_factory=dict)
    messy_kinds: list[str] = field(default_factory=list)


# --- small helpers --------------------------------------------------------------------------------


def weighted_choice(rng: random.Random, weights: dict):
    keys = list(weights)
    return rng.choices(keys, weights=[weights[key] for key in keys])[0]


def ascii_fold(text: str) -> str:
    """`Müller` -> `Muller`, `Łódź` -> `Lodz`: the ASCII form used in emails and domains."""
    decomposed = unicodedata.normalize("NFKD", text.translate(ASCII_FOLDS))
    return decomposed.encode("ascii", "ignore").decode("ascii")


def slug(text: str) -> str:
    return "".join(character for character in ascii_fold(text).lower() if character.isalnum())


def format_number(value: float) -> str:
    """`120.0` -> `120`, `46.8` -> `46.8`: how a billing export writes money."""
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def format_timestamp(moment: datetime, style: str) -> str:
    utc = moment.astimezone(UTC)
    if style == "date":
        return utc.strftime("%Y-%m-%d")
    if style == "offset":
        return (utc + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
    if style == "millis":
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_before_reference(days: float) -> datetime:
    return REFERENCE_TIME - timedelta(seconds=round(days * 86400))


# --- one user -------------------------------------------------------------------------------------


def draw_name(rng: random.Random, country: Country) -> tuple[str, tuple[str, str]]:
    """Display name and its (given, family) romanization, in the country's script and order."""
    given = rng.choice(country.given_names)
    family = rng.choice(country.family_names)
    if isinstance(given, tuple):
        romanized = (given[1], family[1])
        if rng.random() < 0.7:  # most people here write their name in the local script
            if country.name_order == "family_first":
                separator = " " if country.code == "JP" and rng.random() < 0.3 else ""
                return family[0] + separator + given[0], romanized
            return f"{given[0]} {family[0]}", romanized
        return f"{given[1]} {family[1]}", romanized
    name = f"{given} {family}"
    if rng.random() < 0.01:
        name = name.lower()
    if rng.random() < 0.006:
        name = f"{name} {rng.choice(NAME_EMOJI)}"
    return name, (given, family)


def draw_signup(rng: random.Random) -> datetime:
    """Signups grow over three years, with a busier last month (a marketing launch)."""
    if rng.random() < RECENT_SIGNUP_SHARE:
        days_ago = rng.uniform(0, RECENT_WINDOW_DAYS)
    else:
        span = HISTORY_DAYS - RECENT_WINDOW_DAYS
        days_ago = RECENT_WINDOW_DAYS + span * rng.random() ** 1.4
    return seconds_before_reference(days_ago)


def draw_trial_and_plan(rng: random.Random, signed_up_at: datetime) -> tuple[datetime | None, str]:
    """Recent signups start on a Pro trial; older users sometimes had one."""
    age_days = (REFERENCE_TIME - signed_up_at).total_seconds() / 86400
    recent = age_days < RECENT_WINDOW_DAYS
    trial_ends_at = None
    if rng.random() < (0.75 if recent else 0.15):
        trial_days = EXTENDED_TRIAL_DAYS if rng.random() < 0.05 else TRIAL_DAYS
        trial_ends_at = signed_up_at + timedelta(days=trial_days)
    if trial_ends_at and trial_ends_at > REFERENCE_TIME:
        return trial_ends_at, "pro"
    if trial_ends_at and recent:
        return trial_ends_at, weighted_choice(rng, {"free": 65, "starter": 20, "pro": 15})
    return trial_ends_at, weighted_choice(rng, NEW_USER_PLAN_WEIGHTS if recent else PLAN_WEIGHTS)


def draw_billing(rng: random.Random, plan: str, on_trial: bool) -> tuple[int, float]:
    """Seats and monthly recurring revenue consistent with the plan's price list."""
    if on_trial:
        return rng.randint(1, 5), 0.0
    discount = ANNUAL_DISCOUNT if rng.random() < 0.4 else 1.0
    if plan == "free":
        return (1 if rng.random() < 0.75 else rng.randint(2, 3)), 0.0
    if plan == "starter":
        seats = rng.randint(1, 10)
        return seats, round(seats * STARTER_SEAT_PRICE * discount, 2)
    if plan == "pro":
        seats = 3 + int(57 * rng.random() ** 2)
        return seats, round(seats * PRO_SEAT_PRICE * discount, 2)
    seats = 50 + int(1450 * rng.random() ** 2.5)
    return seats, float(round(seats * rng.choice(ENTERPRISE_SEAT_PRICES), -1))


def draw_last_seen(rng: random.Random, plan: str, signed_up_at: datetime) -> datetime | None:
    age_days = (REFERENCE_TIME - signed_up_at).total_seconds() / 86400
    if age_days < RECENT_WINDOW_DAYS:
        return None if rng.random() < 0.1 else seconds_before_reference(rng.uniform(0, age_days))
    engagement = weighted_choice(rng, FREE_ENGAGEMENT if plan == "free" else PAID_ENGAGEMENT)
    if engagement == "never":
        return None
    low, high = ENGAGEMENT_WINDOWS[engagement]
    return seconds_before_reference(min(rng.uniform(low, high), age_days))


def draw_company(
    rng: random.Random,
    country: Country,
    plan: str,
    companies: dict[tuple[str, str], list[Company]],
    used_domains: set[str],
) -> Company | None:
    """Teammates share companies; bigger plans work at bigger companies."""
    if rng.random() > (0.55 if plan == "free" else 0.97):
        return None
    size = rng.choice(COMPANY_SIZES_BY_PLAN[plan])
    existing = companies.setdefault((country.code, size), [])
    if existing and rng.random() < COMPANY_REUSE_PROBABILITY[size]:
        return rng.choice(existing)
    name, domain_stem = draw_company_name(rng, country)
    candidates = [f"{domain_stem}.example", f"{domain_stem}-{country.code.lower()}.example"]
    counter = 2
    while candidates[0] in used_domains:
        candidates.pop(0)
        if not candidates:
            candidates.append(f"{domain_stem}{counter}.example")
            counter += 1
    domain = candidates[0]
    used_domains.add(domain)
    company = Company(name, domain, size)
    existing.append(company)
    return company


def draw_company_name(rng: random.Random, country: Country) -> tuple[str, str]:
    if country.code in NATIVE_COMPANY_PARTS and rng.random() < 0.6:
        prefix, words, kinds = NATIVE_COMPANY_PARTS[country.code]
        word, kind = rng.choice(words), rng.choice(kinds)
        return prefix + word[0] + kind[0], word[1] + kind[1]
    if country.local_words and rng.random() < 0.35:
        stem = f"{rng.choice(country.local_words)} {rng.choice(COMPANY_INDUSTRIES)}"
    else:
        stem = rng.choice(COMPANY_PREFIXES) + rng.choice(COMPANY_SUFFIXES)
        if rng.random() < 0.3:
            stem = f"{stem} {rng.choice(COMPANY_INDUSTRIES)}"
    name = f"{stem} {country.legal_suffix}" if country.legal_suffix and rng.random() < 0.7 else stem
    return name, slug(stem)


def draw_email(
    rng: random.Random, romanized: tuple[str, str], company: Company | None, used_emails: set[str]
) -> str | None:
    if rng.random() < 0.03:
        return None
    given, family = (slug(part) for part in romanized)
    if company:
        local = rng.choice((f"{given}.{family}", f"{given[0]}{family}", given, f"{given}_{family}"))
        domain = company.domain
    else:
        local = rng.choice(
            (
                f"{given}.{family}",
                f"{given}{family}{rng.randint(1, 99)}",
                f"{family}.{given}{rng.randint(70, 99)}",
            )
        )
        domain = rng.choice(PERSONAL_EMAIL_DOMAINS)
    email = f"{local}@{domain}"
    counter = 2
    while email in used_emails:
        email = f"{local}{counter}@{domain}"
        counter += 1
    used_emails.add(email)
    if rng.random() < 0.02:  # some signup forms keep the user's capitalisation
        return f"{local.title()}@{domain}"
    return email


def draw_phone(rng: random.Random, country: Country) -> str | None:
    if rng.random() < 0.45:
        return None
    if country.phone_prefix == "+1":  # 555-01xx numbers are reserved for fiction
        digits = f"{rng.randint(201, 989)}55501{rng.randint(0, 99):02d}"
    else:
        digits = str(rng.randint(1, 9))  # no leading zero after the country code
        digits += "".join(str(rng.randint(0, 9)) for _ in range(country.phone_digits - 1))
    if rng.random() < 0.1:
        return f"{country.phone_prefix} {digits[:3]} {digits[3:6]} {digits[6:]}"
    return country.phone_prefix + digits


def draw_tags(rng: random.Random, plan: str) -> list[str] | None:
    if rng.random() > {"free": 0.15, "starter": 0.35, "pro": 0.5, "enterprise": 0.7}[plan]:
        return None
    roles = ["admin"] if rng.random() < 0.35 else []
    roles += rng.sample([role for role in ROLE_TAGS if role != "admin"], rng.randint(0, 2))
    return roles or [rng.choice(ROLE_TAGS)]


def draw_feature_flags(rng: random.Random) -> list[str]:
    if rng.random() < 0.04:
        return ["beta_optout"] if rng.random() < 0.6 else ["dark_mode", "beta_optout"]
    if rng.random() < 0.04:
        return []
    flags: list[str] = []
    for _ in range(weighted_choice(rng, {1: 50, 2: 35, 3: 15})):
        remaining = {
            flag: weight for flag, weight in FEATURE_FLAG_WEIGHTS.items() if flag not in flags
        }
        flags.append(weighted_choice(rng, remaining))
    if "beta_dashboard" in flags and "beta_reports" not in flags and rng.random() < 0.4:
        flags.append("beta_reports")  # the two betas were offered together
    return flags


def draw_onboarding_steps(rng: random.Random, age_days: float) -> int:
    if age_days < TRIAL_DAYS:
        return weighted_choice(rng, {0: 20, 1: 25, 2: 20, 3: 15, 4: 10, 5: 10})
    if age_days < 120:
        return ONBOARDING_TOTAL_STEPS if rng.random() < 0.55 else rng.randint(1, 4)
    return ONBOARDING_TOTAL_STEPS if rng.random() < 0.9 else rng.randint(2, 4)


def draw_properties(rng: random.Random, plan: str, signed_up_at: datetime) -> dict:
    """Extra custom properties, the ones that go in the CSV's `properties` JSON column."""
    age_days = (REFERENCE_TIME - signed_up_at).total_seconds() / 86400
    properties: dict = {}
    if rng.random() < 0.5:
        properties["preferences"] = {"digest": weighted_choice(rng, DIGEST_WEIGHTS)}
        if rng.random() < 0.3:
            properties["preferences"]["marketing_emails"] = rng.random() < 0.6
    if rng.random() < 0.28:
        properties["feature_flags"] = draw_feature_flags(rng)
    if age_days > TRIAL_DAYS and rng.random() < (0.2 if plan == "free" else 0.4):
        low, high = weighted_choice(rng, NPS_BANDS)
        properties["nps_score"] = rng.randint(low, high)
    if rng.random() < (0.85 if age_days < 120 else 0.25):
        properties["onboarding"] = {
            "completed_steps": draw_onboarding_steps(rng, age_days),
            "total_steps": ONBOARDING_TOTAL_STEPS,
        }
    if plan != "free" and rng.random() < 0.25:
        properties["usage"] = {
            "dashboards": rng.randint(1, 120),
            "api_calls_30d": rng.randint(0, 250000),
        }
    if rng.random() < 0.15:
        properties["referral_source"] = rng.choice(REFERRAL_SOURCES)
    return properties


def draw_timestamp_style(rng: random.Random) -> str:
    """Most exports write UTC with `Z`; a few tools write local offsets, dates or milliseconds."""
    return weighted_choice(rng, {"utc": 95, "offset": 2, "date": 1.5, "millis": 1.5})


def draw_user(
    rng: random.Random, companies: dict, used_domains: set[str], used_emails: set[str]
) -> User:
    weights = [country.weight for country in COUNTRIES]
    country = COUNTRIES[rng.choices(range(len(COUNTRIES)), weights=weights)[0]]
    city = rng.choice(country.cities)
    name, romanized = draw_name(rng, country)
    signed_up_at = draw_signup(rng)
    trial_ends_at, plan = draw_trial_and_plan(rng, signed_up_at)
    on_trial = trial_ends_at is not None and trial_ends_at > REFERENCE_TIME
    seats, mrr = draw_billing(rng, plan, on_trial)
    company = draw_company(rng, country, plan, companies, used_domains)
    recent = REFERENCE_TIME - signed_up_at < timedelta(days=RECENT_WINDOW_DAYS)
    return User(
        id="",
        name=None if rng.random() < 0.02 else name,
        romanized_name=romanized,
        email=draw_email(rng, romanized, company, used_emails),
        phone_number=draw_phone(rng, country),
        avatar=AVATAR_URL.format(f"{rng.getrandbits(48):012x}") if rng.random() < 0.45 else None,
        locale=None if rng.random() < 0.03 else (city.locale or country.locale),
        timezone=None if rng.random() < 0.03 else city.timezone,
        plan=plan,
        seats=None if rng.random() < 0.02 else seats,
        mrr=None if rng.random() < 0.03 else mrr,
        tags=draw_tags(rng, plan),
        signed_up_at=signed_up_at,
        last_seen_at=draw_last_seen(rng, plan, signed_up_at),
        trial_ends_at=trial_ends_at,
        is_verified=None if rng.random() < 0.01 else rng.random() < (0.6 if recent else 0.88),
        city=None if rng.random() < 0.04 else city.name,
        country=None if rng.random() < 0.02 else country.code,
        company=company,
        properties=draw_properties(rng, plan, signed_up_at),
        timestamp_style=draw_timestamp_style(rng),
    )


def draw_staff_user(rng: random.Random, index: int, used_emails: set[str]) -> User:
    """Lumenboard's own employees: internal accounts that audiences usually exclude."""
    country = COUNTRY_BY_CODE[STAFF_COUNTRIES[index % len(STAFF_COUNTRIES)]]
    city = rng.choice(country.cities)
    name, romanized = draw_name(rng, country)
    company = Company("Lumenboard Inc.", PRODUCT_DOMAIN, "51-200")
    signed_up_at = seconds_before_reference(rng.uniform(60, HISTORY_DAYS))
    return User(
        id="",
        name=name,
        romanized_name=romanized,
        email=draw_email(rng, romanized, company, used_emails) or f"staff{index}@{PRODUCT_DOMAIN}",
        phone_number=None,
        avatar=AVATAR_URL.format(f"{rng.getrandbits(48):012x}"),
        locale=city.locale or country.locale,
        timezone=city.timezone,
        plan="enterprise",
        seats=1,
        mrr=0.0,
        tags=["admin", "internal"] + (["support"] if rng.random() < 0.3 else []),
        signed_up_at=signed_up_at,
        last_seen_at=seconds_before_reference(rng.uniform(0.02, 2)),
        trial_ends_at=None,
        is_verified=True,
        city=city.name,
        country=country.code,
        company=company,
        properties={
            "preferences": {"digest": "daily"},
            "feature_flags": [*ALL_BETA_FLAGS, "dark_mode"],
            "onboarding": {"completed_steps": 5, "total_steps": ONBOARDING_TOTAL_STEPS},
        },
        is_staff=True,
    )


def assign_ids(rng: random.Random, users: list[User]) -> None:
    """Mostly `user_00042` in signup order; some UUIDs (an old auth system) and some email ids."""
    for sequence, user in enumerate(users, start=1):
        style = weighted_choice(rng, {"sequential": 92, "uuid": 5, "email": 3})
        if style == "uuid":
            user.id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        elif style == "email" and user.email:
            user.id = user.email.lower()
        else:
            user.id = f"user_{sequence:05d}"


# --- messy rows -----------------------------------------------------------------------------------


def corrupt_json(text: str, variant: int) -> str:
    """Properties text no JSON parser accepts, broken the ways spreadsheets and hand edits do."""
    variants = (
        lambda: text[:-1],  # lost closing brace
        lambda: text.replace('"', "'"),  # Python-style quotes
        lambda: text[:-1] + ",}",  # trailing comma
        lambda: text.replace('"', ""),  # quotes stripped
        lambda: text + "}",  # extra brace
    )
    return variants[variant % len(variants)]()


def long_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "sso|okta|" + "".join(rng.choice(alphabet) for _ in range(rng.randint(260, 320)))


def make_messy(rng: random.Random, user: User, kind: str, variant: int) -> None:
    """Record how this user's CSV row should be broken; the typed data stays untouched."""
    user.messy_kinds.append(kind)
    overrides = user.csv_overrides
    properties_text = render_properties(user.properties or {"nps_score": 8})
    if kind == "missing_id":
        overrides["id"] = ""
    elif kind == "blank_id":
        overrides["id"] = BLANK_IDS[variant % len(BLANK_IDS)]
    elif kind == "padded_id":
        paddings = (f" {user.id}", f"{user.id} ", f"  {user.id}  ", f"{user.id}   ")
        overrides["id"] = paddings[variant % len(paddings)]
    elif kind == "long_id":
        overrides["id"] = long_id(rng)
    elif kind == "newline_id":
        overrides["id"] = f"{user.id[:7]}\n{user.id[7:]}"
    elif kind == "tab_id":
        overrides["id"] = f"{user.id}\t" if variant % 2 else f"user_\t{user.id[5:]}"
    elif kind == "invalid_json_properties":
        overrides["properties"] = corrupt_json(properties_text, variant)
    elif kind == "list_properties":
        overrides["properties"] = LIST_PROPERTIES[variant % len(LIST_PROPERTIES)]
    elif kind == "leading_zero_seats":
        overrides["seats"] = f"{user.seats:03d}"
    elif kind == "decimal_mrr":
        overrides["mrr"] = f"{user.mrr:.2f}"
    elif kind == "exponent_mrr":
        user.mrr, overrides["mrr"] = EXPONENT_MRR[variant % len(EXPONENT_MRR)]
    elif kind == "unreadable_signed_up_at":
        overrides["signed_up_at"] = UNREADABLE_DATES[variant % len(UNREADABLE_DATES)]
    elif kind == "sparse":
        for column in CSV_COLUMNS:
            if column not in ("id", "email", "signed_up_at"):
                overrides[column] = ""


def fits_messy_kind(kind: str, user: User) -> bool:
    """Money oddities only make sense on paying users, zero-padded seats on small teams."""
    if kind in ("decimal_mrr", "exponent_mrr"):
        return user.plan in ("starter", "pro") and bool(user.mrr)
    if kind == "leading_zero_seats":
        return user.seats is not None and user.seats < 100
    return True


def sprinkle_messy_rows(rng: random.Random, users: list[User]) -> None:
    """Break scattered rows (never staff, never UUID or email ids), each in exactly one way."""
    candidates = [
        index
        for index, user in enumerate(users)
        if not user.is_staff and user.id.startswith("user_")
    ]
    rng.shuffle(candidates)
    for kind, count in MESSY_ROW_COUNTS.items():
        chosen = [index for index in candidates if fits_messy_kind(kind, users[index])][:count]
        for variant, index in enumerate(chosen):
            make_messy(rng, users[index], kind, variant)
            candidates.remove(index)


def updated_copy(rng: random.Random, user: User) -> User:
    """The same user re-exported later: they upgraded and came back."""
    later = copy.deepcopy(user)
    later.messy_kinds = ["duplicate_id"]
    later.csv_overrides = {}
    if later.plan in PLAN_UPGRADES:
        later.plan = PLAN_UPGRADES[later.plan]
        later.seats, later.mrr = draw_billing(rng, later.plan, on_trial=False)
    later.last_seen_at = seconds_before_reference(rng.uniform(0.02, 1))
    return later


def insert_duplicates(rng: random.Random, users: list[User]) -> list[User]:
    """Add DUPLICATE_ROW_COUNT rows that repeat an earlier clean user's id further down."""
    clean = [
        index
        for index, user in enumerate(users[: len(users) - 300])
        if not user.messy_kinds and not user.is_staff
    ]
    originals = sorted(rng.sample(clean, DUPLICATE_ROW_COUNT))
    insert_after = {index: rng.randint(index + 50, len(users) - 1) for index in originals}
    result: list[User] = []
    pending: dict[int, list[User]] = {}
    for original in originals:
        pending.setdefault(insert_after[original], []).append(updated_copy(rng, users[original]))
    for index, user in enumerate(users):
        result.append(user)
        result.extend(pending.get(index, []))
    return result


# --- rendering ------------------------------------------------------------------------------------


def render_properties(properties: dict) -> str:
    return json.dumps(properties, ensure_ascii=False) if properties else ""


def render_csv_row(user: User) -> list[str]:
    def text(value) -> str:
        return "" if value is None else str(value)

    def moment(value: datetime | None, style: str) -> str:
        return "" if value is None else format_timestamp(value, style)

    is_verified = "" if user.is_verified is None else ("true" if user.is_verified else "false")
    row = {
        "id": user.id,
        "name": text(user.name),
        "email": text(user.email),
        "phone_number": text(user.phone_number),
        "avatar": text(user.avatar),
        "locale": text(user.locale),
        "timezone": text(user.timezone),
        "plan": user.plan,
        "seats": text(user.seats),
        "mrr": "" if user.mrr is None else format_number(user.mrr),
        "tags": json.dumps(user.tags, separators=(",", ":")) if user.tags else "",
        "signed_up_at": moment(user.signed_up_at, user.timestamp_style),
        "last_seen_at": moment(
            user.last_seen_at, "offset" if user.timestamp_style == "offset" else "utc"
        ),
        "trial_ends_at": moment(user.trial_ends_at, "utc"),
        "is_verified": is_verified,
        "address.city": text(user.city),
        "address.country": text(user.country),
        "company.name": user.company.name if user.company else "",
        "company.size": user.company.size if user.company else "",
        "properties": render_properties(user.properties),
    }
    row.update(user.csv_overrides)
    return [row[column] for column in CSV_COLUMNS]


def csv_cell(value: str) -> str:
    """Quote a cell when it holds a separator, a quote, a line break, a tab or edge whitespace."""
    needs_quotes = any(character in value for character in ',"\r\n\t') or value != value.strip()
    return '"' + value.replace('"', '""') + '"' if needs_quotes else value


def write_users_csv(path: Path, users: list[User]) -> None:
    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(csv_cell(cell) for cell in render_csv_row(user)) for user in users]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")


# --- the identify stream (Parquet) ----------------------------------------------------------------

UPDATE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("name", pa.string()),
        ("email", pa.string()),
        ("phone_number", pa.string()),
        ("avatar", pa.string()),
        ("locale", pa.string()),
        ("timezone", pa.string()),
        ("plan", pa.string()),
        ("seats", pa.int64()),
        ("mrr", pa.float64()),
        ("tags", pa.string()),
        ("signed_up_at", pa.timestamp("us", tz="UTC")),
        ("last_seen_at", pa.timestamp("us", tz="UTC")),
        ("trial_ends_at", pa.timestamp("us", tz="UTC")),
        ("is_verified", pa.bool_()),
        ("address", pa.struct([("city", pa.string()), ("country", pa.string())])),
        ("company.name", pa.string()),
        ("company.size", pa.string()),
        ("feature_flags", pa.list_(pa.string())),
    ]
)
UPDATE_KIND_WEIGHTS = {
    "upgrade": 22,
    "trial_converted": 10,
    "trial_cancelled": 4,
    "move_city": 16,
    "activity": 22,
    "beta_enrolment": 10,
    "verified": 8,
    "downgrade": 6,
    "phone_removed": 2,
}


def apply_update(rng: random.Random, user: User, kind: str, seen_at: datetime) -> None:
    """Change `user` the way one identify call would; every update also bumps last_seen_at."""
    user.last_seen_at = max(user.last_seen_at or seen_at, seen_at)
    flags = user.properties.get("feature_flags")
    if kind == "upgrade" and user.plan in PLAN_UPGRADES:
        user.plan = PLAN_UPGRADES[user.plan]
        user.seats, user.mrr = draw_billing(rng, user.plan, on_trial=False)
        user.trial_ends_at = None
    elif kind == "trial_converted":
        user.plan = "pro"
        user.seats, user.mrr = draw_billing(rng, "pro", on_trial=False)
        user.trial_ends_at = None
    elif kind == "trial_cancelled":
        user.plan, user.seats, user.mrr, user.trial_ends_at = "free", 1, 0.0, None
    elif kind == "move_city":
        country = COUNTRY_BY_CODE[user.country] if rng.random() < 0.6 else rng.choice(COUNTRIES)
        other_cities = [city for city in country.cities if city.name != user.city]
        city = rng.choice(other_cities or list(country.cities))
        user.city, user.country, user.timezone = city.name, country.code, city.timezone
        user.locale = city.locale or country.locale
    elif kind == "beta_enrolment":
        user.properties["feature_flags"] = [flag for flag in (flags or []) if flag != "beta_optout"]
        for flag in ("beta_dashboard", "beta_reports") if rng.random() < 0.6 else ("beta_api",):
            if flag not in user.properties["feature_flags"]:
                user.properties["feature_flags"].append(flag)
    elif kind == "verified":
        user.is_verified = True
    elif kind == "downgrade" and user.plan in PLAN_DOWNGRADES:
        user.plan = PLAN_DOWNGRADES[user.plan]
        user.seats, user.mrr = draw_billing(rng, user.plan, on_trial=False)
    elif kind == "phone_removed":
        user.phone_number = None


def eligible_for(kind: str, user: User) -> bool:
    on_trial = user.trial_ends_at is not None and user.trial_ends_at > REFERENCE_TIME
    return {
        "upgrade": user.plan in PLAN_UPGRADES and not on_trial,
        "trial_converted": on_trial,
        "trial_cancelled": on_trial,
        "move_city": user.country in COUNTRY_BY_CODE,
        "verified": user.is_verified is False,
        "downgrade": user.plan in PLAN_DOWNGRADES and not on_trial,
        "phone_removed": user.phone_number is not None,
    }.get(kind, True)


def update_row(user: User) -> dict:
    address = {"city": user.city, "country": user.country}
    if user.city is None and user.country is None:
        address = None
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "phone_number": user.phone_number,
        "avatar": user.avatar,
        "locale": user.locale,
        "timezone": user.timezone,
        "plan": user.plan,
        "seats": user.seats,
        "mrr": user.mrr,
        "tags": json.dumps(user.tags, separators=(",", ":")) if user.tags else None,
        "signed_up_at": user.signed_up_at,
        "last_seen_at": user.last_seen_at,
        "trial_ends_at": user.trial_ends_at,
        "is_verified": user.is_verified,
        "address": address,
        "company.name": user.company.name if user.company else None,
        "company.size": user.company.size if user.company else None,
        "feature_flags": user.properties.get("feature_flags"),
    }


def build_updates(rng: random.Random, users: list[User]) -> list[dict]:
    """~200 updates to clean, existing users in time order; a few users are updated twice."""
    clean = [
        user
        for user in users
        if not user.messy_kinds and not user.is_staff and user.id.strip() == user.id
    ]
    duplicated_ids = {user.id for user in users if "duplicate_id" in user.messy_kinds}
    clean = [user for user in clean if user.id not in duplicated_ids]
    trials = [user for user in clean if eligible_for("trial_converted", user)]
    picked = rng.sample(trials, min(len(trials), 20))
    picked_ids = {user.id for user in picked}
    others = [user for user in clean if user.id not in picked_ids]
    picked += rng.sample(others, UPDATE_ROW_COUNT - REPEAT_UPDATE_COUNT - len(picked))
    targets = picked + rng.sample(picked, REPEAT_UPDATE_COUNT)
    window_seconds = int(UPDATE_WINDOW.total_seconds())
    moments = sorted(
        REFERENCE_TIME + timedelta(seconds=rng.randint(600, window_seconds)) for _ in targets
    )
    order = list(range(len(targets)))
    rng.shuffle(order)
    states = {user.id: copy.deepcopy(user) for user in picked}
    rows = []
    for moment, target_index in zip(moments, order, strict=True):
        state = states[targets[target_index].id]
        kinds = [kind for kind in UPDATE_KIND_WEIGHTS if eligible_for(kind, state)]
        kind = weighted_choice(rng, {kind: UPDATE_KIND_WEIGHTS[kind] for kind in kinds})
        apply_update(rng, state, kind, moment)
        rows.append(update_row(state))
    return rows


def write_updates_parquet(path: Path, rows: list[dict]) -> None:
    columns = {name: [row[name] for row in rows] for name in UPDATE_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=UPDATE_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


# --- audiences ------------------------------------------------------------------------------------


def write_audiences(directory: Path) -> None:
    documents = {
        key: {
            "name": name,
            "type": "dynamic",
            "description": description,
            "segments": [{"conditions": conditions} for conditions in segments],
        }
        for key, (name, description, segments) in DYNAMIC_AUDIENCES.items()
    }
    documents.update(
        {
            key: {"name": name, "type": "static", "description": description}
            for key, (name, description) in STATIC_AUDIENCES.items()
        }
    )
    for key, document in documents.items():
        target = directory / key / "audience.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        target.write_text(text, encoding="utf-8")


# --- entry point ----------------------------------------------------------------------------------


def generate_users(rng: random.Random) -> list[User]:
    companies: dict[tuple[str, str], list[Company]] = {}
    used_domains: set[str] = {PRODUCT_DOMAIN}
    used_emails: set[str] = set()
    customer_count = CSV_ROW_COUNT - DUPLICATE_ROW_COUNT - STAFF_COUNT
    users = [draw_user(rng, companies, used_domains, used_emails) for _ in range(customer_count)]
    users += [draw_staff_user(rng, index, used_emails) for index in range(STAFF_COUNT)]
    users.sort(key=lambda user: user.signed_up_at)
    assign_ids(rng, users)
    sprinkle_messy_rows(rng, users)
    return insert_duplicates(rng, users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where to write sources/ and audiences/ (default: the repo's data/)",
    )
    arguments = parser.parse_args()
    rng = random.Random(SEED)
    users = generate_users(rng)
    write_users_csv(arguments.data_dir / "sources" / "users.csv", users)
    updates = build_updates(rng, users)
    write_updates_parquet(arguments.data_dir / "sources" / "user_updates.parquet", updates)
    write_audiences(arguments.data_dir / "audiences")
    print(
        f"wrote {len(users)} user rows, {len(updates)} updates and "
        f"{len(DYNAMIC_AUDIENCES) + len(STATIC_AUDIENCES)} audiences to {arguments.data_dir}"
    )


if __name__ == "__main__":
    main()
