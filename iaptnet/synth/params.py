"""The numbers the synthetic network is built to reproduce (docs/reference/synthetic.md#targets), in one place.

Every share, mean and effect the generator plants lives here so that a reader can check the
targets against docs/reference/synthetic.md without reading the sampling code. Values marked [fitted] were tuned
by simulation so that the generated marginals meet the §E targets (e.g. integer ages).
"""

from __future__ import annotations

import math

#: Seed used when the caller gives none (the CLI default too).
DEFAULT_SEED = 20210901
#: Size of the source study's pooled cohort.
PAPER_PATIENTS = 483_683
PAPER_SERVICES = 8

# ---------------------------------------------------------------- services
#: §E service shares for the 8-service network.
SERVICE_SHARES_8 = (0.17, 0.10, 0.18, 0.12, 0.13, 0.09, 0.10, 0.11)
#: NCEL network services (docs/reference/synthetic.md#the-catalogue). Barnet/Enfield/Haringey is split in two to make 8 [A].
SERVICE_NAMES_8 = (
    "camden_islington",
    "barnet",
    "city_hackney",
    "enfield_haringey",
    "newham",
    "waltham_forest",
    "redbridge",
    "barking_havering",
)
#: Their service codes (service_id), in the same order: made up, in the form of ODS
#: organisation codes (three capital letters and digits), naming no real organisation. Their
#: sorted order is the network's order, so the first (camden_islington) is service_id's
#: reference level, as it was when the codes were "1".."8".
SERVICE_CODES_8 = ("ZN1", "ZN2", "ZN3", "ZN4", "ZN5", "ZN6", "ZN7", "ZN8")
#: SD of the service random intercept on logit P(reliable recovery).
SERVICE_SD = 0.15
#: Networks of another size (e.g. the 128 services of a national run): service sizes are
#: log-normal with this SD of log size (the log-normal's quantiles, so the sizes do not
#: depend on the seed; the largest of 128 services is ~24 times the smallest, about the
#: spread of NHS Talking Therapies providers' yearly referrals) [A], in an order drawn with
#: SERVICE_CODE_SEED, as are their made-up codes ("Z", then a letter other than I, O or Z,
#: then a letter or digit; never one of SERVICE_CODES_8).
SERVICE_SIZE_SIGMA = 0.6
SERVICE_CODE_SEED = 20240401
MAX_SERVICES = 500

# ---------------------------------------------------------------- referral dates
REFERRAL_START = "2012-04-01"
REFERRAL_END = "2020-03-31"  # inclusive
#: IAPT dataset v2.0 end codes apply to referrals discharged from this date.
V2_FROM = "2020-04-01"

# ---------------------------------------------------------------- demographics
#: Age bands (inclusive integer ranges) and their shares. §E gives .200/.315/.210/.150/.080/.045
#: for a continuous age; with whole-year ages those give mean 37.35, so the three middle shares
#: are refitted (18-24 and 65+ kept) to the published mean 37.83 and SD 14.40 [fitted].
AGE_BANDS = ((18, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, 85))
AGE_SHARES = (0.2000, 0.2800, 0.2316, 0.1635, 0.0799, 0.0450)

#: Female share of known gender; share of referrals with gender not known (9, X or blank).
FEMALE_SHARE = 311_790 / (311_790 + 158_860)
GENDER_MISSING = 13_033 / 483_683
#: How a missing gender is written: (code or None for a blank cell, share).
GENDER_MISSING_CODES = (("X", 0.55), ("9", 0.05), (None, 0.40))

#: NHS ethnic codes with their share of known ethnicity [A: §E group shares split by code].
ETHNIC_CODES = {
    # White 64.6%
    "A": 0.450,
    "B": 0.020,
    "C": 0.176,
    # Mixed 5%
    "D": 0.015,
    "E": 0.010,
    "F": 0.010,
    "G": 0.015,
    # Asian 12%
    "H": 0.035,
    "J": 0.025,
    "K": 0.040,
    "L": 0.020,
    # Black 12%
    "M": 0.045,
    "N": 0.060,
    "P": 0.015,
    # Other 6.4% (R Chinese counts as Other in the NHS groups, as Asian in ONS groups)
    "R": 0.012,
    "S": 0.052,
}
ETHNIC_WHITE = ("A", "B", "C")
ETHNIC_MISSING = 95_570 / 483_683
ETHNIC_MISSING_CODES = (("Z", 0.60), ("99", 0.15), (None, 0.25))
#: Deprivation raises the BME share: multiplier on P(BME) by IMD quintile 1..5 (mean ~1 over
#: the quintile shares, so the marginal stays at 35.4%) [A].
BME_BY_IMD = (1.15, 1.00, 0.85, 0.70, 0.60)

#: IMD quintile shares (1 most deprived) [A].
IMD_SHARES = (0.38, 0.35, 0.16, 0.08, 0.03)
IMD_MISSING = 0.03

#: Employment among known, by age band (rows follow AGE_BANDS; columns 01..08). Young adults:
#: a third students, NEET 17% of referrals so that NEET is ~15% of the young adults in the
#: analysed cohort (NEET finish less often). 65+: 70% retired (§E says ~85%; lowered because
#: retirement is then nearly collinear with older_adult in D4, whose CI would be missed at
#: random too often), with more early retirement at 55-64. Bands fill the §E marginal
#: (01 58, 02 13, 03 7, 04 7, 05 5, 06 3, 07 1, 08 6) [A].
EMPLOYMENT_CODES = ("01", "02", "03", "04", "05", "06", "07", "08")
EMPLOYMENT_BY_AGE = (
    (0.500, 0.090, 0.330, 0.025, 0.025, 0.020, 0.010, 0.000),  # 18-24: NEET .17
    (0.660, 0.150, 0.010, 0.070, 0.060, 0.035, 0.010, 0.005),  # 25-34
    (0.660, 0.150, 0.005, 0.085, 0.060, 0.030, 0.010, 0.000),  # 35-44
    (0.623, 0.150, 0.002, 0.110, 0.050, 0.035, 0.010, 0.020),  # 45-54
    (0.395, 0.140, 0.000, 0.130, 0.040, 0.035, 0.010, 0.250),  # 55-64
    (0.220, 0.010, 0.000, 0.030, 0.020, 0.010, 0.010, 0.700),  # 65+
)
#: Deprivation raises not working: odds multiplier for 02/04/06 by IMD quintile [A].
JOBLESS_BY_IMD = (1.30, 1.05, 0.85, 0.70, 0.55)
EMPLOYMENT_MISSING = 0.08  # written as ZZ

#: Long-term condition by age band (18% of known overall, 45% of 65+) [A].
LTC_BY_AGE = (0.09, 0.12, 0.17, 0.25, 0.35, 0.45)
LTC_MISSING = 0.35
#: Any disability: base share, plus this much with an LTC (12% overall) [A].
DISABILITY_BASE = 0.084
DISABILITY_LTC = 0.20
DISABILITY_CODES = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "XX")
DISABILITY_MISSING = 0.45  # written as ZZ
#: Psychotropic medication at first contact: 40% overall, more with depression severity [A].
PSYCHOTROPIC_SHARE = 0.40
PSYCHOTROPIC_MISSING = 0.30

#: Sexual orientation among those recorded [A]; 40% not recorded (blank, declined or unknown).
SEXUAL_ORIENTATION = {
    "20430005": 0.880,
    "89217008": 0.025,
    "76102007": 0.012,
    "38628009": 0.013,
    "42035005": 0.040,
    "765288000": 0.010,
    "1064711000000100": 0.020,
}
SEXUAL_ORIENTATION_MISSING = 0.40
SEXUAL_ORIENTATION_MISSING_CODES = (("699042003", 0.15), ("440583007", 0.15), (None, 0.70))

#: Referral source: self 45%, GP 45%, other 10% spread over the other codes [A].
REFERRAL_SOURCES = {
    "B1": 0.45,
    "A1": 0.45,
    "H2": 0.015,
    "C1": 0.015,
    "G1": 0.010,
    "G3": 0.010,
    "M1": 0.010,
    "M3": 0.010,
    "P1": 0.010,
    "D1": 0.005,
    "E1": 0.005,
    "F1": 0.005,
    "N3": 0.005,
}
REFERRAL_SOURCE_MISSING = 0.02

#: Problem descriptor shares (§E; F32/F33 split 25/8; "other/unspecified" split OTHER_MH 4%,
#: BDD 0.3%, UNSPECIFIED 6.2%) [A].
PROBLEMS = {
    "F32": 0.250,
    "F33": 0.080,
    "F41.1": 0.200,
    "F41.2": 0.140,
    "F43.1": 0.050,
    "F41.0": 0.040,
    "F40.1": 0.030,
    "F42": 0.030,
    "F45.2": 0.020,
    "F40.2": 0.015,
    "F40.0": 0.010,
    "F40-F43": 0.030,
    "OTHER_MH": 0.040,
    "BDD": 0.003,
    "UNSPECIFIED": 0.062,
}

# ---------------------------------------------------------------- baseline scores
#: Means/SDs (before rounding and clipping) of PHQ-9, GAD-7, WSAS at first contact. §E gives
#: N(15, 6), N(13.5, 5), N(19, 9); the PHQ-9/GAD-7 means are lowered a little so that 89% of
#: finishers are at caseness [fitted].
SCORE_MEAN = (13.7, 12.0, 19.0)
SCORE_SD = (6.0, 5.0, 9.0)
SCORE_CORR = ((1.00, 0.70, 0.55), (0.70, 1.00, 0.45), (0.55, 0.45, 1.00))
OLDER_PHQ_SHIFT = -2.0
LTC_WSAS_SHIFT = 1.5
SCORES_MISSING_FINISHERS = 0.02  # last PHQ-9/GAD-7/WSAS pair not recorded
WSAS_MISSING = 0.10

# ---------------------------------------------------------------- funnel and treatment
#: Shares of referrals: never start (n_treat 0), one session, finished (>= 2).
SHARE_NEVER = 0.30
SHARE_ONE = 0.28
SHARE_FINISHED = 0.42
#: Attrition (end code 43 / 47) among entrants, its planted log-odds ratios, and how it shapes
#: finishing: dropouts mostly stop after one session [A].
ATTRITION_SHARE = 0.48
ATTRITION_LOG_OR = {"older": math.log(0.48), "neet": math.log(1.31)}
FINISH_GIVEN_ATTRITION_LOG_OR = -1.55
#: Log-odds effects on entering treatment and on finishing once entered [A, direction from §E].
#: Young and NEET referrals finish less mostly through their higher attrition.
ENTER_LOG_OR = {"older": 0.40, "young": -0.05, "neet": -0.10, "imd1": -0.15, "unemployed": -0.10}
FINISH_LOG_OR = {"older": 0.70, "young": 0.0, "neet": 0.0, "imd1": -0.10, "unemployed": -0.10}

#: Intensity among the treated and attended treatment sessions by intensity among finishers
#: (2 + negative binomial). §E means 5 / 10 / 12 give 7.8 overall; scaled to the 7.0 target.
INTENSITY_LEVELS = ("LI", "HI", "stepped")
INTENSITY_SHARES = (0.50, 0.35, 0.15)
#: One-session entrants: share whose session was low intensity (the rest high). Stepped care:
#: share whose primary (most-attended) therapy is still the low-intensity one.
ONE_SESSION_LI = 0.45
STEPPED_PRIMARY_LI = 0.10
SESSIONS_MEAN = (4.6, 9.0, 11.0)
SESSIONS_SD = (2.5, 5.0, 5.0)
#: Effects on the expected number of extra sessions [A]: log-scale per year of age, NEET
#: multiplier, log-scale per missed appointment (DNA-sessions correlation about -0.15).
SESSIONS_AGE = 0.006
SESSIONS_NEET = 0.85
SESSIONS_PER_DNA = -0.10
#: Latent engagement lowering missed appointments (log-odds per SD).
ENGAGE_DNA = -0.45

#: Missed appointments among finishers: 50% none, mean ~1.05, long tail (hurdle: 1 + NB) [A].
#: The hurdle and tail describe the appointments a patient's engagement would lead them to miss;
#: the secular trend and the SMS reminders (below) then keep each with a probability of 0.59-1
#: (reminders.py). The hurdle is calibrated so that the count kept (the extract's n_dna) has
#: DNA_ZERO zeros; the tail mean is raised from 1.1 so that the kept count among those with
#: any keeps its mean of ~2.1 [fitted].
DNA_ZERO = 0.50
DNA_EXTRA_MEAN = 1.3  # mean of (missed - 1) among those with any, before the trend and reminders
DNA_EXTRA_SIZE = 0.35  # NB size of that tail
#: Odds multipliers on having any DNA [A: deprivation, youth and NEET raise DNAs, age lowers;
#: the deprivation terms are sized so that finishers in IMD Q1 miss ~0.3 more than in Q5].
DNA_LOG_OR = {"imd1": 0.65, "imd2": 0.32, "young": 0.20, "neet": 0.35, "older": -0.40, "age10": -0.08}
#: Patient and provider cancellations per scheduled contact. The appointments the trend and
#: the reminders kept from being missed are patient cancellations too (cancelled ahead), so the
#: patient rate is lowered from 0.09 to keep patient cancellations ~8% of scheduled [fitted].
CANCEL_PT_RATE = 0.062
CANCEL_PROV_RATE = 0.055

#: Days from referral to first treatment: log-normal, median 35, P(<= 42) = 0.87.
WAIT_MEDIAN = 35.0
WAIT_SIGMA = math.log(42 / 35) / 1.1264  # Phi^-1(0.87) = 1.1264

#: Primary therapy target shares among the treated (§E), split into LI / HI types; "other 4%"
#: spread over the small types, BA 3% split LI 1.5 / HI 1.5 [A]. Sampling weights are raked so
#: that, after the NICE mismatch steering, each type keeps its share within its intensity.
THERAPY_SHARES = {
    "GSH_BOOK": 18.0,
    "GSH_COMP": 14.0,
    "PSYED_PEER": 8.0,
    "BA_LI": 1.5,
    "NGSH_BOOK": 0.8,
    "NGSH_COMP": 0.6,
    "PHYS_ACT": 0.5,
    "MINDFUL": 0.6,
    "SIGNPOST": 0.5,
    "OTHER_LI": 1.0,
    "CBT": 32.0,
    "CFD": 12.0,
    "IPT": 3.0,
    "EMDR": 3.0,
    "BA_HI": 1.5,
    "DIT": 1.5,
    "COUPLES_DEP": 0.5,
    "APPLIED_RELAX": 1.0,
    "COLLAB_CARE": 0.3,
    "OTHER_HI": 0.5,
}
#: Share of referrals with a NICE guideline whose primary therapy is not recommended, by problem
#: group (about 25% overall; counselling for anxiety is the usual mismatch) [A].
MISMATCH_BY_GROUP = {
    "depression": 0.18,
    "gad": 0.33,
    "panic": 0.30,
    "agoraphobia": 0.30,
    "social_anxiety": 0.35,
    "specific_phobia": 0.30,
    "ocd": 0.30,
    "ptsd": 0.30,
    "health_anxiety": 0.35,
    "bdd": 0.35,
}

# ---------------------------------------------------------------- planted outcome model
#: logit P(reliable recovery) among finishers at caseness (§E), on the derived variables.
OUTCOME_TARGET = 0.46
OUTCOME_LOG_OR = {
    "n_treat": math.log(1.09),
    "n_dna": math.log(0.85),
    "nice_mismatch": math.log(0.91),
    "older_adult": math.log(1.33),
    "neet": math.log(0.68),
    "imd2": 0.05,
    "imd3": 0.10,
    "imd4": 0.17,
    "imd5": math.log(1.28),
    "asian": math.log(0.82),
    "other_ethnic": math.log(0.79),
    "white_other": math.log(0.93),
    "phq9_first": -0.07,  # per point above 15
    "gad7_first": -0.05,  # per point above 13.5
    "wsas_first": -0.02,  # per point above 19
    "ltc": math.log(0.80),
    "unemployed_25plus": math.log(0.75),
    "psychotropic_med": math.log(0.88),
    "wait_weeks": -0.01,
}
#: How Y is drawn from its probabilities. "independent": one Bernoulli per row. "balanced":
#: systematic sampling within strata (complete-case pattern x service x retired x older x
#: young x NEET x IMD quintile x NICE mismatch x missed appointments 0..4+), so that each row
#: still has exactly its planted probability but the number of recoveries in each stratum is
#: its expectation within one. This removes most of the sampling noise from the exposure
#: estimates, so the catalogue models land inside the published intervals for almost every
#: seed rather than for ~80% of seeds [design choice].
OUTCOME_SAMPLING = "balanced"
#: Among finishers (paired scores): reliable improvement 65%, reliable deterioration 6% with
#: NEET odds 1.41.
IMPROVEMENT_SHARE = 0.65
DETERIORATION_SHARE = 0.06
DETERIORATION_LOG_OR = {"neet": math.log(1.41)}

# ---------------------------------------------------------------- outcome measures (§B.2)
PHQ_CUT, PHQ_RCI, PHQ_MAX = 10, 6, 27
GAD_CUT, GAD_RCI, GAD_MAX = 8, 4, 21
WSAS_MAX = 40

# ---------------------------------------------------------------- missingness
#: Missingness is MCAR: independent of every value. Covariates that a service's staff record
#: together at first contact tend to be missing together, modelled by a Gaussian copula with
#: this correlation between the missingness indicators [A]. 0 gives independent masks; higher
#: values give more complete cases at the same per-column rates.
MISSING_COPULA_RHO = 0.97

# ---------------------------------------------------------------- service change: SMS reminders
#: The date each service began sending SMS appointment reminders (service order as
#: SERVICE_NAMES_8; a network of k < 8 services uses the first k, a larger one repeats
#: them in turn: service k has the date of service (k - 1) mod 8 + 1). Dates are the first of a
#: month so the step falls on a referral_month boundary; staggered 2015-04..2018-10 so that a
#: pooled interrupted time series separates the step from the secular trend [A].
REMINDER_DATES_8 = (
    "2016-01-01",  # camden_islington
    "2017-04-01",  # barnet
    "2015-04-01",  # city_hackney
    "2018-10-01",  # enfield_haringey
    "2016-07-01",  # newham
    "2017-10-01",  # waltham_forest
    "2018-04-01",  # redbridge
    "2015-10-01",  # barking_havering
)
#: Planted effect on the odds of missing a booked appointment for referrals made on or after
#: the service's reminder date: an immediate level change (odds ratio), and a change of slope
#: (log-odds per month; none planted) [A].
REMINDER_ODDS_RATIO = 0.75
REMINDER_SLOPE_CHANGE = 0.0
#: Secular trend of the odds of missing an appointment over the whole period, before and after
#: the reminders: -3% a year, in log-odds per referral month [A].
DNA_TREND_PER_MONTH = math.log(0.97) / 12

# ---------------------------------------------------------------- population denominators
#: Adults (18+) living in each service's catchment, order as SERVICE_NAMES_8 [A: rounded from
#: ONS mid-year estimates for the boroughs, around 2016]: 2.45 million in all. The shipped
#: population.csv is for the paper-scale network; other sizes scale these by
#: patients / PAPER_PATIENTS (and a network of k != 8 services splits the scaled total evenly).
POPULATION_ADULTS_8 = (420_000, 300_000, 225_000, 460_000, 260_000, 210_000, 225_000, 350_000)
#: Population shares of the age bands (AGE_BANDS order; 65+ means 65 and over) [A: London
#: boroughs are young: 65+ is ~14% of adults against ~23% in England]. Referrals are 4.5% 65+,
#: so older adults' referral rate is ~0.29 times that of 18-64 year olds (under-represented).
POPULATION_AGE_SHARES = (0.12, 0.25, 0.20, 0.17, 0.12, 0.14)
#: Female share of adults [A].
POPULATION_FEMALE_SHARE = 0.51
#: ONS 2011 five ethnic groups (R Chinese counted as Asian) among adults of the catchments [A:
#: Census 2011 for the NCEL boroughs, roughly]. Referrals (known ethnicity) are 64.6% White,
#: 13.2% Asian: Asian adults are referred less often.
POPULATION_ETHNIC_SHARES = {"White": 0.58, "Mixed": 0.05, "Asian": 0.19, "Black": 0.13, "Other": 0.05}
#: The population's IMD quintile profile is the referrals' (IMD_SHARES): access is similar
#: across deprivation (abstract), so every quintile has the same referral rate in expectation.
