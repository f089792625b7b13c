# The inverse-probability-weighting reference (kind = "iptw"), from R's glm, sandwich and survey.
#
# Input: iptw_input.csv (3 services). iaptnet's definition (tests/reference_propensity.py,
# iaptnet/protocol/kinds/propensity.py):
#   - the propensity model glm(t ~ g + h + x1 + x2, binomial) on the pooled cohort;
#   - ATE weights 1/ps for the exposed and 1/(1 - ps) for controls, stabilised: times the share
#     of the exposed / of the controls; ATT weights 1 and ps/(1 - ps);
#   - the outcome model glm(y ~ t [+ covariates], binomial) with the weights as prior weights
#     (statsmodels' var_weights), and robust HC0 standard errors:
#     (X'WX)^-1 (sum_i s_i s_i') (X'WX)^-1 with s_i the weighted score of row i, no small-sample
#     factor. That is sandwich::vcovHC(fit, type = "HC0") on the weighted glm.
#   - survey::svyglm on svydesign(ids = ~1, weights = ~w) has the same estimates, and its
#     covariance is the same sandwich times n / (n - 1) (its with-replacement variance of the
#     estimating functions); recorded too, so the tests can show which one iaptnet's is.
# The binomial glm with non-integer prior weights warns "non-integer #successes"; its estimates,
# deviance and covariances are those of the weighted likelihood all the same (statsmodels'
# var_weights), so that one warning is muffled.
#
# Run from tests/results: Rscript make_iptw.R (make references).

source("common.R")
suppressPackageStartupMessages({
  library(sandwich)
  library(survey)
})

d <- read.csv("iptw_input.csv", stringsAsFactors = FALSE)
d$g <- factor(d$g, levels = c("a", "b", "c"))
exposed <- d$t == 1

ps <- glm_exact(t ~ g + h + x1 + x2, binomial(), d)
p <- fitted(ps)

weights_for <- function(estimand, stabilized) {
  if (estimand == "ATT") return(ifelse(exposed, 1, p / (1 - p)))
  w <- ifelse(exposed, 1 / p, 1 / (1 - p))
  if (stabilized) w <- w * ifelse(exposed, mean(exposed), 1 - mean(exposed))
  w
}

quiet_binomial <- function(expr) {
  withCallingHandlers(expr, warning = function(w) {
    if (grepl("non-integer #successes", conditionMessage(w), fixed = TRUE)) invokeRestart("muffleWarning")
  })
}

analyses <- list(
  ate_stabilized = list(estimand = "ATE", stabilized = TRUE, formula = y ~ t),
  att_adjusted = list(estimand = "ATT", stabilized = FALSE, formula = y ~ t + g + h + x1 + x2)
)

results <- lapply(analyses, function(a) {
  w <- weights_for(a$estimand, a$stabilized)
  fit <- quiet_binomial(glm_exact(a$formula, binomial(), d, weights = w))
  hc0 <- vcovHC(fit, type = "HC0")
  design <- svydesign(ids = ~1, weights = ~.w, data = transform(d, .w = w))
  svy <- svyglm(a$formula, design = design, family = quasibinomial(),
                control = glm.control(epsilon = 1e-14, maxit = 200))
  stopifnot(max(abs(coef(svy) - coef(fit))) < 1e-10)
  groups <- list(exposed = exposed, control = !exposed)
  list(
    estimand = a$estimand, stabilized = a$stabilized, formula = deparse(a$formula),
    weighting = lapply(groups, function(m) list(n = sum(m), sum_weights = sum(w[m]),
                                                effective_n = sum(w[m])^2 / sum(w[m]^2))),
    outcome = c(list(n = nrow(d), deviance = deviance(fit), null_deviance = fit$null.deviance),
                coef_table(fit, hc0),
                list(std_error_model = as.list(sqrt(diag(vcov(fit)))),
                     std_error_svyglm = as.list(sqrt(diag(vcov(svy))))))
  )
})

result <- c(list(propensity_model = c(list(formula = "t ~ g + h + x1 + x2", n = nrow(d)),
                                      coef_table(ps, vcov(ps)))),
            results)
write_reference(result, "iptw", "make_iptw.R", c("sandwich", "survey", "jsonlite"))
