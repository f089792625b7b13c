# The random-intercept references (random_intercept = COLUMN), from lme4::glmer and lme4::lmer.
#
# Inputs, written here from public data that R ships (so that R and Python read the same
# doubles; make_inputs.py's other inputs are simulated or read from statsmodels), each split
# into services of unequal size with every group (cluster) inside one service:
#   - glmm_binomial_input.csv: lme4's VerbAgg (verbal aggression, 316 people x 24 items,
#     r2 = "Y" as y = 1), the people in 5 services of 50, 90, 36, 80 and 60 people (by id);
#     groups are the people (id).
#   - glmm_poisson_input.csv: lme4's Arabidopsis (625 plants, total fruits), the services its 3
#     regions (NL 116, SP 292, SW 217 plants); groups are the 24 genotypes (gen), each within
#     one region. nutrient = 1 for the high level (8), rack = 1 for rack 2.
#   - glmm_gaussian_input.csv: nlme's Milk (protein content of 1,337 weekly samples of 79
#     cows), the cows in 4 services of 20, 25, 14 and 20 (in the data's order of cows); groups
#     are the cows (cow 1..79 in that order); diet barley, mixed (barley+lupins), lupins.
#
# Models: glmer(y ~ ... + (1 | group), nAGQ = 1 and nAGQ = 10) for the binomial and poisson
# inputs; lmer(..., REML = FALSE) and lmer(..., REML = TRUE) for the gaussian one.
#
# lme4 optimises the Laplace / adaptive Gauss-Hermite deviance over (theta, beta) (lmer: the
# profiled deviance over theta) with bobyqa, which stops with a gradient of about 1e-4 even at
# rhoend = 1e-12. So the optimizer given to lme4 here (`polish`) runs bobyqa (rhoend = 1e-12)
# and then two Newton steps on lme4's own deviance function with numDeriv's Richardson gradient
# and Hessian (the second step is already at the deviance's rounding noise, a gradient of about
# 1e-4 from PIRLS's warm starts: 1e-7 in the estimates); everything recorded is then lme4's own output for that
# optimum: fixef(), sqrt(diag(vcov())) (glmer: from lme4's finite-difference Hessian of the
# deviance in (theta, beta), deriv12 with delta 1e-4, as summary() prints; lmer: sigma^2 times
# the RX inverse), VarCorr() and logLik(). PIRLS's tolerance is tightened to 1e-13 (default
# 1e-7: its inexact conditional modes move the Laplace deviance by about 0.01 on these data).
# Recorded besides, for comparison: the same with glmer's own optimizer (bobyqa, rhoend 1e-12),
# `unpolished`; and, for glmer, standard errors from numDeriv's Richardson Hessian at the
# optimum (`std_error_richardson`): lme4's deriv12 Hessian carries rounding noise of the
# deviance divided by delta^2, about 1e-6 relative here.
#
# Run from tests/results: Rscript make_glmm.R (make references).

source("common.R")
suppressPackageStartupMessages({
  library(lme4)
  library(numDeriv)
})

# --- inputs ----------------------------------------------------------------------------------

write_input <- function(frame, name) {
  write.csv(frame, paste0(name, "_input.csv"), row.names = FALSE, quote = FALSE)
  cat(sprintf("%s_input.csv: %d rows\n", name, nrow(frame)))
}

verbagg <- local({
  d <- lme4::VerbAgg
  id <- as.integer(as.character(d$id))
  people <- c(50, 90, 36, 80, 60)
  site <- paste0("s", findInterval(id, cumsum(c(0, people)) + 1) - 1)
  out <- data.frame(site = site, id = id, y = as.integer(d$r2 == "Y"), anger = d$Anger,
                    gender = as.character(d$Gender), btype = as.character(d$btype),
                    situ = as.character(d$situ), mode = as.character(d$mode))
  out[order(out$site, seq_len(nrow(out))), ]
})
write_input(verbagg, "glmm_binomial")

arabidopsis <- local({
  d <- lme4::Arabidopsis
  out <- data.frame(site = as.character(d$reg), gen = d$gen, total_fruits = d$total.fruits,
                    nutrient = as.integer(d$nutrient == 8), amd = as.character(d$amd),
                    rack = as.integer(d$rack == 2),
                    status = c(Normal = "normal", Petri.Plate = "petri", Transplant = "transplant")[as.character(d$status)])
  out[order(out$site, seq_len(nrow(out))), ]
})
write_input(arabidopsis, "glmm_poisson")

milk <- local({
  d <- nlme::Milk
  cows <- unique(as.character(d$Cow))
  cow <- match(as.character(d$Cow), cows)
  sizes <- c(20, 25, 14, 20)
  site <- paste0("s", findInterval(cow, cumsum(c(0, sizes)) + 1) - 1)
  diet <- c(barley = "barley", "barley+lupins" = "mixed", lupins = "lupins")[as.character(d$Diet)]
  out <- data.frame(site = site, cow = cow, protein = d$protein, diet = unname(diet), time = d$Time)
  out[order(out$site, seq_len(nrow(out))), ]
})
write_input(milk, "glmm_gaussian")

# --- the optimiser: bobyqa, then Newton on lme4's own deviance --------------------------------

polish <- function(par, fn, lower, upper, control = list(), ...) {
  first <- minqa::bobyqa(par, fn, lower, upper, control = list(rhoend = 1e-12, maxfun = 1e5))
  p <- first$par
  H <- numDeriv::hessian(fn, p)
  for (i in 1:2) p <- pmax(p - solve(H, numDeriv::grad(fn, p)), lower)
  g <- numDeriv::grad(fn, p)
  list(par = p, fval = fn(p), conv = 0, feval = first$feval,
       message = sprintf("bobyqa (rhoend 1e-12), then 2 Newton steps; then max |gradient| %.2g", max(abs(g))))
}

bobyqa_tight <- function(par, fn, lower, upper, control = list(), ...) {
  opt <- minqa::bobyqa(par, fn, lower, upper, control = list(rhoend = 1e-12, maxfun = 1e5))
  list(par = opt$par, fval = opt$fval, conv = opt$ierr, feval = opt$feval, message = opt$msg)
}

no_check <- list(check.conv.grad = "ignore", check.conv.singular = "ignore", check.conv.hess = "ignore")

glmer_control <- function(optimizer) {
  do.call(glmerControl, c(list(optimizer = c("bobyqa", optimizer), tolPwrss = 1e-13), no_check))
}
lmer_control <- function(optimizer) do.call(lmerControl, c(list(optimizer = optimizer), no_check))

# --- the fits --------------------------------------------------------------------------------

fields <- function(fit, group, extra = list()) {
  vc <- as.data.frame(VarCorr(fit))
  random <- vc[vc$grp == group, ]
  out <- list(n = nobs(fit), n_groups = unname(ngrps(fit)[group]),
              variance = random$vcov, std_dev = random$sdcor,
              loglik = as.numeric(logLik(fit)), optimizer = fit@optinfo$message)
  if (isLMM(fit)) {
    out$residual_variance <- sigma(fit)^2
    out$residual_std_dev <- sigma(fit)
  }
  c(out, list(estimate = as.list(fixef(fit)), std_error = as.list(sqrt(diag(as.matrix(vcov(fit)))))), extra)
}

richardson_se <- function(fit) {
  dd <- update(fit, devFunOnly = TRUE)
  par <- c(getME(fit, "theta"), fixef(fit))
  H <- numDeriv::hessian(dd, par)
  V <- 2 * solve(H)[-1, -1]
  setNames(as.list(sqrt(diag(V))), names(fixef(fit)))
}

glmm_model <- function(formula, family, data, nagq, group, label) {
  fit <- glmer(formula, data = data, family = family, nAGQ = nagq, control = glmer_control(polish))
  plain <- glmer(formula, data = data, family = family, nAGQ = nagq, control = glmer_control(bobyqa_tight))
  fixed <- paste(deparse(nobars(formula), width.cutoff = 500L), collapse = " ")
  c(list(family = family, formula = fixed, random_intercept = group, nagq = nagq),
    fields(fit, group, list(std_error_richardson = richardson_se(fit),
                            unpolished = fields(plain, group))))
}

lmm_model <- function(formula, data, reml, group) {
  fit <- lmer(formula, data = data, REML = reml, control = lmer_control(polish))
  plain <- lmer(formula, data = data, REML = reml, control = lmer_control(bobyqa_tight))
  fixed <- paste(deparse(nobars(formula), width.cutoff = 500L), collapse = " ")
  c(list(family = "gaussian", formula = fixed, random_intercept = group, reml = reml),
    fields(fit, group, list(unpolished = fields(plain, group))))
}

read_input <- function(name) read.csv(paste0(name, "_input.csv"), stringsAsFactors = FALSE)

b <- read_input("glmm_binomial")
b$gender <- factor(b$gender, levels = c("F", "M"))
b$btype <- factor(b$btype, levels = c("curse", "scold", "shout"))
b$situ <- factor(b$situ, levels = c("other", "self"))
b$mode <- factor(b$mode, levels = c("want", "do"))
binomial_formula <- y ~ anger + gender + btype + situ + mode + (1 | id)

p <- read_input("glmm_poisson")
p$amd <- factor(p$amd, levels = c("clipped", "unclipped"))
p$status <- factor(p$status, levels = c("normal", "petri", "transplant"))
poisson_formula <- total_fruits ~ nutrient + amd + rack + status + (1 | gen)

g <- read_input("glmm_gaussian")
g$diet <- factor(g$diet, levels = c("barley", "mixed", "lupins"))
gaussian_formula <- protein ~ diet + time + (1 | cow)

binomial_results <- list(
  laplace = glmm_model(binomial_formula, "binomial", b, 1L, "id"),
  agq10 = glmm_model(binomial_formula, "binomial", b, 10L, "id")
)
write_reference(binomial_results, "glmm_binomial", "make_glmm.R", c("lme4", "numDeriv", "jsonlite"))

poisson_results <- list(
  laplace = glmm_model(poisson_formula, "poisson", p, 1L, "gen"),
  agq10 = glmm_model(poisson_formula, "poisson", p, 10L, "gen")
)
write_reference(poisson_results, "glmm_poisson", "make_glmm.R", c("lme4", "numDeriv", "jsonlite"))

gaussian_results <- list(
  ml = lmm_model(gaussian_formula, g, FALSE, "cow"),
  reml = lmm_model(gaussian_formula, g, TRUE, "cow")
)
write_reference(gaussian_results, "glmm_gaussian", "make_glmm.R", c("lme4", "nlme", "numDeriv", "jsonlite"))
