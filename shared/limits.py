"""SendGrid's limits and shapes, in one place, each with its source.

Sources: [C] tests/contracts/tsg_mc_contacts_v3.json, [L] tsg_mc_lists_v3.json, [F] tsg_mc_custom_fields_v3.json
(official OpenAPI files, see tests/contracts/PROVENANCE.md); [RL] SendGrid docs, "Rate limits";
[MC] SendGrid docs, "Create and manage contacts". Where the docs are silent the comment says which safe choice we made.
"""

from __future__ import annotations

GLOBAL_BASE_URL = "https://api.sendgrid.com"  # [C] servers
EU_BASE_URL = "https://api.eu.sendgrid.com"  # EU regional subusers (documented for v3; the account's call)
OFFICIAL_HOSTS = frozenset({"api.sendgrid.com", "api.eu.sendgrid.com"})

# PUT /v3/marketing/contacts [C]: "30,000 contacts or 6 MB, whichever is lower". 6 MB is read as 6,000,000 bytes of
# encoded body; we keep a 2,000-byte margin (a few lines of headers, should a proxy count them). A percentage margin
# would cost requests: 1% made a 5-million-profile export take 190 requests where 188 are the minimum.
MAX_CONTACTS_PER_REQUEST = 30_000
MAX_REQUEST_BYTES = 6_000_000
REQUEST_BYTES_TARGET = 5_998_000

# PUT /v3/marketing/contacts/imports [C]: up to 1,000,000 contacts (or 5 GB) per file; gzip allowed.
MAX_CONTACTS_PER_IMPORT_FILE = 1_000_000
MAX_IMPORT_FILE_BYTES = 5 * 1024**3
# Our choice: files of at most 250,000 contacts. A file is uploaded once it is complete and SendGrid's job starts only
# then, so with files of 1,000,000 the whole import waited for the end of the reading; smaller files start their jobs
# while the rest is read (benchmarks/README.md, issue 16). 4 import jobs per million contacts instead of 1.
IMPORT_FILE_CONTACTS = 250_000
BULK_THRESHOLD_DEFAULT = 200_000  # above this many contacts the bulk CSV import is used (issue 5)

# ContactRequest maxLength [C]. postal_code has no stated limit.
MAX_EMAIL_LENGTH = 254
FIELD_MAX_LENGTHS: dict[str, int] = {
    "email": MAX_EMAIL_LENGTH,
    "external_id": 254,
    "anonymous_id": 254,
    "first_name": 50,
    "last_name": 50,
    "state_province_region": 50,
    "country": 50,
    "city": 60,
    "address_line_1": 100,
    "address_line_2": 100,
}
MAX_ALTERNATE_EMAILS = 5

# Writable reserved fields [F] that the ContactRequest schema [C] accepts.
WRITABLE_RESERVED_FIELDS = frozenset(
    {
        "email",
        "alternate_emails",
        "first_name",
        "last_name",
        "address_line_1",
        "address_line_2",
        "city",
        "state_province_region",
        "postal_code",
        "country",
        "external_id",
        "anonymous_id",
    }
)
CUSTOM_FIELD_TYPES = frozenset({"Text", "Number", "Date"})  # [F]
MAX_CUSTOM_FIELDS = 500  # [F]

# Job status values [C]; job_type was seen live as "upsert_contacts" although the spec says "upsert".
JOB_FINAL_STATUSES = frozenset({"completed", "errored", "failed"})
JOB_PENDING = "pending"

# Search and removal [C][L]: search/emails takes at most 100 emails; list removal has no documented cap, so 100 ids a
# call, and every URL is kept well under 8 KB (a front proxy answered 414 to long id lists).
MAX_SEARCH_EMAILS = 100
MAX_IDS_PER_DELETE = 100
MAX_URL_BYTES = 7_000
LISTS_PAGE_SIZE = 1000  # GET /v3/marketing/lists [L]: page_size "Defaults to 100, returns 1000 max"

# Rate limits [RL]: per-endpoint numbers are not published; pace from X-RateLimit-* headers.
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
