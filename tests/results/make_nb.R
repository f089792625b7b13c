# The negative binomial reference (family = "negative_binomial"), from MASS::glm.nb.
#
# Input: nb_input.csv (public data: 3,000 person-years of the RAND Health Insurance
# Experiment's outpatient visits, over 5 services; see make_inputs.py). glm.nb estimates theta
# by maximum likelihood, alternating IRLS for the coefficients at theta with theta.ml at the
# fitted means until the log-likelihood and theta settle; iaptnet maximises the same
# likelihood jointly. Both optimise, so the tests compare to 1e-5 relative: glm.nb is run with
# its alternation and IRLS tolerance tightened to 1e-12 (default 1e-8), but theta.ml inside it
# stops once a Newton step moves theta by less than .Machine$double.eps^0.25 and takes SE(theta)
# from the information before that step. Recorded besides, to show how far that leaves R from
# its own optimum: theta.ml run again at glm.nb's fitted means to a step of 1e-12
# (theta_polished, std_error_theta_polished).
#
# Recorded per model: the coefficients with vcov(fit) (given theta: the GLM covariance at the
# final theta with dispersion 1, as summary() prints), theta and SE.theta, twologlik (2 x the
# log-likelihood), the deviance and null deviance (both at the final theta; the null model's
# intercept refitted at that theta, with the offset when there is one), AIC and n; and the HC0
# sandwich (sandwich::vcovHC, type "HC0": its bread the same inverse expected information).
#
# Run from tests/results: Rscript make_nb.R (make references).

source("common.R")
suppressPackageStartupMessages({
  library(MASS)
  library(sandwich)
})

d <- read.csv("nb_input.csv", stringsAsFactors = FALSE)

TIGHT <- glm.control(epsilon = 1e-12, maxit = 100)

models <- list(
  visits = list(formula = mdvis ~ lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf, offset = NULL),
  visits_offset = list(formula = mdvis ~ idp + physlm + hlthg + hlthf, offset = "log(disea + 1)")
)

results <- lapply(models, function(spec) {
  data <- d
  formula <- spec$formula
  if (!is.null(spec$offset)) {
    data$.off <- eval(parse(text = spec$offset), data)
    formula <- update(formula, . ~ . + offset(.off))
  }
  fit <- withCallingHandlers(glm.nb(formula, data = data, control = TIGHT),
                             warning = function(w) stop("glm.nb warned: ", conditionMessage(w)))
  polished <- theta.ml(data$mdvis, fitted(fit), limit = 100, eps = 1e-12)
  c(list(formula = paste(deparse(spec$formula, width.cutoff = 500L), collapse = " "), offset = if (is.null(spec$offset)) "" else spec$offset,
         n = nrow(data), theta = fit$theta, std_error_theta = fit$SE.theta,
         theta_polished = as.vector(polished), std_error_theta_polished = attr(polished, "SE"),
         twologlik = fit$twologlik, deviance = deviance(fit), null_deviance = fit$null.deviance,
         aic = AIC(fit), df_residual = fit$df.residual),
    coef_table(fit, vcov(fit)),
    list(std_error_hc0 = as.list(sqrt(diag(vcovHC(fit, type = "HC0"))))))
})

write_reference(results, "nb", "make_nb.R", c("MASS", "sandwich", "jsonlite"))
