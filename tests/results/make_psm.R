# The propensity-score matching reference (kind = "psm"), from R's glm, MatchIt and sandwich.
#
# Input: psm_input.csv (4 services). iaptnet's rule (iaptnet/node/matching.py):
#   the propensity model t ~ g + h + x1 + x2 is fitted on the pooled cohort; each service
#   matches its own rows 1:1, nearest neighbour on the logit of the score, without
#   replacement, exposed rows taken from the largest logit down, within a caliper of 0.2 SD of
#   the logit (SD over the whole cohort, n - 1).
# That is MatchIt::matchit(method = "nearest", distance = "glm", link = "linear.logit",
#   m.order = "largest", replace = FALSE, ratio = 1, caliper = 0.2, std.caliper = TRUE,
#   exact = ~ site): MatchIt fits the score on all rows and matches within each exact stratum;
#   its caliper is 0.2 * sd(distance) over all rows. But MatchIt before 4.5.4 (Debian 12 has
#   4.5.1) gets nearest-neighbour matching on a distance vector wrong (below: integer abs()),
#   so the pairs come from the same matchit() with the distance as a matrix of absolute logit
#   differences, which MatchIt's general code (nn_matchC.cpp) matches correctly: the rows put
#   in descending order of the logit with m.order = "data" (= "largest"), and the prescribed
#   call's caliper in logit units. The prescribed call is still run, and the JSON records what
#   it gives (matchit_vector_code).
# Ties: MatchIt's general code takes the first control in data order among equal distances;
#   iaptnet breaks ties (within 1e-9) by row order. The input has a continuous covariate, so no
#   two logits tie, and this script checks that the pairs are unambiguous: MatchIt makes the
#   same pairs with every logit moved by up to 1e-8 at random and with the caliper 1e-7 wider
#   or narrower.
# Then iaptnet's disclosure rule, which is not MatchIt's, applied here to MatchIt's pairs, as
#   iaptnet documents it: while a service leaves 1 to 7 exposed or 1 to 7 controls unmatched,
#   the pair with the largest logit distance is unmatched too (ties: the one matched last).
# The outcome model glm(y ~ t, binomial) on the matched rows, with sandwich::vcovCL clustered
#   on the pair, type "HC1" (G/(G-1) * (n-1)/(n-p), statsmodels' and iaptnet's factor).
#
# Run from tests/results: Rscript make_psm.R (make references).

source("common.R")
suppressPackageStartupMessages({
  library(MatchIt)
  library(sandwich)
})

CALIPER <- 0.2
MIN_LEFT <- 8  # iaptnet's policy default min_subset_difference

d <- read.csv("psm_input.csv", stringsAsFactors = FALSE)
d$g <- factor(d$g, levels = c("a", "b", "c"))
d$row <- ave(seq_len(nrow(d)), d$site, FUN = seq_along) - 1L  # row within its site, from 0
rownames(d) <- paste0(d$site, ":", d$row)
sites <- unique(d$site)

ps <- glm_exact(t ~ g + h + x1 + x2, binomial(), d)
logit <- ps$linear.predictors

# MatchIt as prescribed: distance = "glm", link = "linear.logit", m.order = "largest",
# caliper = 0.2 with std.caliper = TRUE, within sites.
prescribed <- matchit(t ~ g + h + x1 + x2, data = d, method = "nearest", distance = "glm",
                      link = "linear.logit", distance.options = list(epsilon = 1e-14, maxit = 200),
                      m.order = "largest", replace = FALSE, ratio = 1, caliper = CALIPER,
                      std.caliper = TRUE, exact = ~site)
stopifnot(max(abs(prescribed$distance - logit)) < 1e-10)
# MatchIt's caliper is 0.2 * sd(its distance); its glm stops at the last iterate, the score's
# converged logits (glm_exact) differ by < 1e-10, and their SD gives the caliper used below.
stopifnot(unname(prescribed$caliper) == CALIPER * sd(prescribed$distance))
caliper <- CALIPER * sd(logit)
stopifnot(abs(unname(prescribed$caliper) - caliper) < 1e-9 * caliper)

# Pairs as (exposed, control) row names, from a matchit object.
pairs_of <- function(m) {
  mm <- m$match.matrix[, 1]
  mm <- mm[!is.na(mm)]
  data.frame(exposed = names(mm), control = unname(mm), stringsAsFactors = FALSE)
}
key <- function(p) sort(paste(p$exposed, p$control))
beyond <- function(p) sum(abs(logit[p$exposed] - logit[p$control]) > caliper)

# MatchIt before 4.5.4 compares distances with C's integer abs() in nn_matchC_vec.cpp, the
# code for a distance vector (MatchIt's NEWS for 4.5.4: "Fixed a bug where calipers would not
# work properly on some systems", #163; the fix is std::abs). Logit differences below 1 then
# count as 0: the caliper (0.1 here) never applies, and the control below is always taken over
# a nearer one above. The JSON records how many of the prescribed call's pairs lie beyond the
# caliper. MatchIt's general code (nn_matchC.cpp, used for a distance matrix) compares
# doubles: it is used here, with the same rule spelled for a matrix. A matrix admits only
# m.order = "data" and an absolute caliper, so the rows are put in descending order of the
# logit first (ties: row order within the site, as iaptnet), which is m.order = "largest", and
# the caliper is 0.2 * sd(logit) of the converged score (the prescribed call's to 1e-9, above).
by_logit <- d[order(-logit, d$site, d$row), ]
logit_sorted <- logit[rownames(by_logit)]
exposed_rows <- rownames(by_logit)[by_logit$t == 1]
control_rows <- rownames(by_logit)[by_logit$t == 0]
distances <- abs(outer(logit_sorted[exposed_rows], logit_sorted[control_rows], "-"))
dimnames(distances) <- list(exposed_rows, control_rows)
match_with <- function(distances, caliper) {
  matchit(t ~ g + h + x1 + x2, data = by_logit, method = "nearest", distance = distances,
          m.order = "data", replace = FALSE, ratio = 1, caliper = caliper, std.caliper = FALSE,
          exact = ~site)
}
m <- match_with(distances, caliper)
pairs <- pairs_of(m)
stopifnot(beyond(pairs) == 0)

# Unambiguous: the same pairs whatever rounding of the logits or the caliper.
set.seed(1)
for (i in 1:20) {
  moved <- logit_sorted + runif(length(logit_sorted), -1e-8, 1e-8)
  moved <- abs(outer(moved[exposed_rows], moved[control_rows], "-"))
  dimnames(moved) <- dimnames(distances)
  stopifnot(identical(key(pairs_of(match_with(moved, caliper))), key(pairs)))
}
for (factor in c(1 - 1e-7, 1 + 1e-7)) {
  stopifnot(identical(key(pairs_of(match_with(distances, caliper * factor))), key(pairs)))
}

# iaptnet's documented rule, per site, on MatchIt's pairs.
pairs$site <- d[pairs$exposed, "site"]
pairs$distance <- abs(logit[pairs$exposed] - logit[pairs$control])
pairs$order <- rank(-logit[pairs$exposed], ties.method = "first")  # MatchIt's order within a site
per_site <- list()
kept <- list()
for (s in sites) {
  p <- pairs[pairs$site == s, ]
  p <- p[order(p$order), ]
  n_exposed <- sum(d$site == s & d$t == 1)
  n_controls <- sum(d$site == s & d$t == 0)
  matchit_pairs <- nrow(p)
  repeat {
    left <- c(n_exposed, n_controls) - nrow(p)
    if (nrow(p) == 0 || !any(left > 0 & left < MIN_LEFT)) break
    worst <- which(p$distance == max(p$distance))
    p <- p[-worst[length(worst)], ]
  }
  kept[[s]] <- p
  as_rows <- function(q) {
    q <- q[order(d[q$exposed, "row"]), ]
    lapply(seq_len(nrow(q)), function(i) c(d[q$exposed[i], "row"], d[q$control[i], "row"]))
  }
  per_site[[s]] <- list(exposed = n_exposed, controls = n_controls, matchit_pairs = matchit_pairs,
                        pairs = nrow(p), matchit_pair_rows = as_rows(pairs[pairs$site == s, ]),
                        pair_rows = as_rows(p))
}
kept <- do.call(rbind, kept)

# The outcome model on the matched rows, clustered on the pair.
matched <- rbind(data.frame(d[kept$exposed, ], pair = seq_len(nrow(kept))),
                 data.frame(d[kept$control, ], pair = seq_len(nrow(kept))))
outcome <- glm_exact(y ~ t, binomial(), matched)
clustered <- vcovCL(outcome, cluster = matched$pair, type = "HC1", cadjust = TRUE)

result <- list(
  propensity_model = c(list(formula = "t ~ g + h + x1 + x2", n = nrow(d)), coef_table(ps, vcov(ps))),
  logit_sd = sd(logit),
  caliper = caliper,
  matchit_vector_code = list(
    note = paste("matchit(distance = 'glm', link = 'linear.logit', m.order = 'largest', std.caliper = TRUE)",
                 "as prescribed; MatchIt < 4.5.4 compares distances with integer abs() there"),
    pairs = nrow(pairs_of(prescribed)), pairs_beyond_caliper = beyond(pairs_of(prescribed)),
    same_pairs = identical(key(pairs_of(prescribed)), key(pairs))),
  min_left = MIN_LEFT,
  sites = per_site,
  n_pairs = nrow(kept),
  outcome = c(list(formula = "y ~ t", n = nrow(matched), n_clusters = nrow(kept),
                   deviance = deviance(outcome), null_deviance = outcome$null.deviance),
              coef_table(outcome, clustered),
              list(std_error_model = as.list(sqrt(diag(vcov(outcome))))))
)
write_reference(result, "psm", "make_psm.R", c("MatchIt", "sandwich", "jsonlite"))
