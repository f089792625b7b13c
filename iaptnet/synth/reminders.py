"""The planted service change: SMS appointment reminders (for the service-change evaluation).

Each service started SMS reminders on a date (params.REMINDER_DATES_8). For referrals made on or
after that date the odds of missing a booked appointment are multiplied by
params.REMINDER_ODDS_RATIO (an immediate level change), on top of a mild secular trend
(params.DNA_TREND_PER_MONTH) that runs through the whole period; no change of slope is planted
(params.REMINDER_SLOPE_CHANGE). On the monthly aggregates the later analysis uses,

    logit( sum n_dna / sum (n_dna + n_treat) ) = a_service + trend * month
                                                 + log(odds ratio) * after
                                                 + slope change * months since the change,

with month = referral_month (months since April 2012) and after = month >= the service's
reminder month, holds in expectation: pathway.py draws the missed appointments a patient's
engagement would have led to, then keeps each one with probability `dna_retention`; the others
were cancelled ahead by the patient instead (n_cancel_pt), so the course and the attended
sessions do not change. Keeping each with probability r multiplies the expected number of
missed appointments, and so the odds sum n_dna / sum n_treat, by exactly r.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from . import params as P
from .network import service_names
from .population import service_codes

#: Service name -> reminder start date, for the 8-service (paper) network.
REMINDER_DATES: dict[str, dt.date] = {
    name: dt.date.fromisoformat(day) for name, day in zip(P.SERVICE_NAMES_8, P.REMINDER_DATES_8)
}
#: service_id (as written in the extract of the paper network: its code, "ZN1".."ZN8") ->
#: reminder start date. Other networks: `reminder_dates_by_code`.
REMINDER_DATES_BY_SERVICE_ID: dict[str, dt.date] = {
    code: dt.date.fromisoformat(day) for code, day in zip(P.SERVICE_CODES_8, P.REMINDER_DATES_8)
}

_START = dt.date.fromisoformat(P.REFERRAL_START)
#: Referral months in the period (April 2012 .. March 2020).
N_MONTHS = 96


def month_index(day: dt.date) -> int:
    """referral_month of a date: months since April 2012 (0 = April 2012)."""
    return (day.year - _START.year) * 12 + (day.month - _START.month)


#: service_id -> referral_month of the first referral month with reminders.
REMINDER_MONTH_BY_SERVICE_ID: dict[str, int] = {k: month_index(day) for k, day in REMINDER_DATES_BY_SERVICE_ID.items()}


def _date_of(k: int) -> dt.date:
    """The reminder date of service k (1-based): the paper's 8 dates in turn."""
    return dt.date.fromisoformat(P.REMINDER_DATES_8[(k - 1) % len(P.REMINDER_DATES_8)])


def reminder_dates(services: int = P.PAPER_SERVICES) -> dict[str, dt.date]:
    """Node name -> reminder date for a network of `services` services (names as in its
    network.toml: the NCEL names for 8, service_<k> otherwise)."""
    return {name: _date_of(k) for k, name in enumerate(service_names(services), start=1)}


def reminder_dates_by_code(services: int = P.PAPER_SERVICES) -> dict[str, dt.date]:
    """service_id (the service's code) -> reminder date for a network of `services` services."""
    return {code: _date_of(k) for k, code in enumerate(service_codes(services), start=1)}


def referral_month(referral_day: np.ndarray) -> np.ndarray:
    """Months since April 2012 for days since REFERRAL_START (as the node derives it)."""
    days = np.datetime64(P.REFERRAL_START, "D") + np.asarray(referral_day).astype("timedelta64[D]")
    months = days.astype("datetime64[M]").astype(np.int64)
    return months - np.datetime64(P.REFERRAL_START, "M").astype(np.int64)


def log_dna_odds_shift(service: np.ndarray, month: np.ndarray) -> np.ndarray:
    """Planted log odds-ratio of missing an appointment by service (1-based) and referral
    month, relative to an unspecified baseline: trend, reminder level change, slope change."""
    start = np.asarray(P.REMINDER_DATES_8)
    months = np.asarray([month_index(dt.date.fromisoformat(d)) for d in start])
    change = months[(np.asarray(service) - 1) % len(months)]
    month = np.asarray(month, dtype=float)
    after = month >= change
    return (
        P.DNA_TREND_PER_MONTH * month
        + np.log(P.REMINDER_ODDS_RATIO) * after
        + P.REMINDER_SLOPE_CHANGE * np.where(after, month - change, 0.0)
    )


def dna_retention(service: np.ndarray, month: np.ndarray, services: int) -> np.ndarray:
    """Probability that a missed appointment the patient would have had is still missed: the
    odds shift scaled so that its largest value over the network's services and months is 1."""
    grid_s = np.repeat(np.arange(1, services + 1), N_MONTHS)
    grid_m = np.tile(np.arange(N_MONTHS), services)
    top = log_dna_odds_shift(grid_s, grid_m).max()
    return np.exp(log_dna_odds_shift(service, month) - top)
