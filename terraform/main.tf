# Kiln on AWS: the composition of the submodules in modules/. See README.md for what it makes,
# how to deploy examples/minimal and what it costs, and docs/production.md for running it.

data "aws_availability_zones" "available" {
  state = "available"
}

data "aws_ssm_parameter" "ubuntu" {
  count = var.service_ami_id == null ? 1 : 0
  name  = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
}

locals {
  zones       = var.availability_zones != null ? var.availability_zones : slice(data.aws_availability_zones.available.names, 0, 3)
  service_ami = var.service_ami_id != null ? var.service_ami_id : nonsensitive(data.aws_ssm_parameter.ubuntu[0].value)
  bucket      = coalesce(var.bucket_name, "${var.name}-store-${var.region}")
  prefix      = "kiln"
  url         = "https://${var.domain_name}"
  # Every process's settings that are not secret (the secrets are fetched at boot).
  settings = merge({
    KILN_ENV              = "production"
    KILN_URL              = local.url
    KILN_NATS_URL         = module.nats.url
    KILN_STREAM_REPLICAS  = "3"
    KILN_STORE_URL        = "s3://${local.bucket}/${local.prefix}"
    KILN_SHUTDOWN_TIMEOUT = "30"
    KILN_METRICS_PORT     = "9464"
    AWS_DEFAULT_REGION    = var.region
  }, var.extra_settings)
  nats_secrets = module.secrets.nats_secret_arns
  secrets = {
    router    = { kiln = module.secrets.kiln_secret_arn, nats_platform = local.nats_secrets["platform"], database = module.data.database_secret_arn, redis = module.secrets.redis_secret_arn, stripe = module.secrets.stripe_secret_arn }
    scheduler = { kiln = module.secrets.kiln_secret_arn, nats_platform = local.nats_secrets["platform"], database = module.data.database_secret_arn }
    billing   = { kiln = module.secrets.kiln_secret_arn, nats_platform = local.nats_secrets["platform"], database = module.data.database_secret_arn, stripe = module.secrets.stripe_secret_arn }
    gpu_node  = { kiln = module.secrets.kiln_secret_arn, nats_platform = local.nats_secrets["platform"] }
    nats      = { server = local.nats_secrets["server"], tls = local.nats_secrets["tls"] }
  }
  package = "kiln[aws]==${var.kiln_version}"
}

module "network" {
  source             = "./modules/network"
  name               = var.name
  region             = var.region
  cidr               = var.vpc_cidr
  availability_zones = local.zones
  single_nat_gateway = var.single_nat_gateway
  public_cidrs       = var.public_cidrs
  monitoring_cidr    = coalesce(var.monitoring_cidr, var.vpc_cidr)
  router_port        = var.router_port
  kms_key_arn        = var.kms_key_arn
}

module "secrets" {
  source      = "./modules/secrets"
  name        = var.name
  kms_key_arn = var.kms_key_arn
}

module "data" {
  source                     = "./modules/data"
  name                       = var.name
  subnet_ids                 = module.network.private_subnet_ids
  database_security_group_id = module.network.security_group_ids["database"]
  redis_security_group_id    = module.network.security_group_ids["redis"]
  db_instance_class          = var.db_instance_class
  db_storage_gb              = var.db_storage_gb
  redis_node_type            = var.redis_node_type
  redis_auth_token           = module.secrets.redis_auth_token
  bucket                     = local.bucket
  prefix                     = local.prefix
  deletion_protection        = var.deletion_protection
  kms_key_arn                = var.kms_key_arn
}

module "iam" {
  source      = "./modules/iam"
  name        = var.name
  bucket      = local.bucket
  prefix      = local.prefix
  secret_arns = { for tier, named in local.secrets : tier => values(named) }
  kms_key_arn = var.kms_key_arn
}

module "nats" {
  source            = "./modules/nats"
  name              = "${var.name}-nats"
  region            = var.region
  subnet_ids        = module.network.private_subnet_ids
  subnet_cidrs      = module.network.private_subnet_cidrs
  security_group_id = module.network.security_group_ids["nats"]
  instance_profile  = module.iam.instance_profiles["nats"]
  ami_id            = local.service_ami
  instance_type     = var.nats_instance_type
  jetstream_gb      = var.jetstream_gb
  tls_secret_arn    = local.nats_secrets["tls"]
  server_secret_arn = local.nats_secrets["server"]
  kms_key_arn       = var.kms_key_arn
}

module "routers" {
  source                   = "./modules/routers"
  name                     = "${var.name}-router"
  region                   = var.region
  vpc_id                   = module.network.vpc_id
  public_subnet_ids        = module.network.public_subnet_ids
  private_subnet_ids       = module.network.private_subnet_ids
  alb_security_group_id    = module.network.security_group_ids["alb"]
  router_security_group_id = module.network.security_group_ids["router"]
  certificate_arn          = var.certificate_arn
  router_port              = var.router_port
  deletion_protection      = var.deletion_protection
  package                  = local.package
  settings                 = local.settings
  secrets                  = local.secrets.router
  database_host            = module.data.database_address
  redis_host               = module.data.redis_address
  ami_id                   = local.service_ami
  instance_type            = var.router_instance_type
  min_size                 = var.router_min
  max_size                 = var.router_max
  instance_profile         = module.iam.instance_profiles["router"]
  kms_key_arn              = var.kms_key_arn
}

module "scheduler" {
  source            = "./modules/service"
  name              = "${var.name}-scheduler"
  part              = "scheduler"
  region            = var.region
  package           = local.package
  settings          = local.settings
  secrets           = local.secrets.scheduler
  database_host     = module.data.database_address
  ami_id            = local.service_ami
  instance_type     = var.scheduler_instance_type
  min_size          = var.scheduler_count
  max_size          = var.scheduler_count
  subnet_ids        = module.network.private_subnet_ids
  security_group_id = module.network.security_group_ids["scheduler"]
  instance_profile  = module.iam.instance_profiles["scheduler"]
  kms_key_arn       = var.kms_key_arn
}

module "billing" {
  source            = "./modules/service"
  name              = "${var.name}-billing"
  part              = "billing"
  region            = var.region
  package           = local.package
  settings          = local.settings
  secrets           = local.secrets.billing
  database_host     = module.data.database_address
  ami_id            = local.service_ami
  instance_type     = var.billing_instance_type
  min_size          = var.billing_count
  max_size          = var.billing_count
  subnet_ids        = module.network.private_subnet_ids
  security_group_id = module.network.security_group_ids["billing"]
  instance_profile  = module.iam.instance_profiles["billing"]
  kms_key_arn       = var.kms_key_arn
}

module "gpu_nodes" {
  source            = "./modules/gpu_nodes"
  name              = var.name
  region            = var.region
  instance_type     = var.gpu_instance_type
  spot_alternatives = var.gpu_spot_alternatives
  min_size          = var.gpu_min
  max_size          = var.gpu_max
  warm_pool_size    = var.gpu_warm_pool
  spot_max_size     = var.gpu_spot_max
  cache_gb          = var.gpu_cache_gb
  ami_id            = var.gpu_ami_id
  subnet_ids        = module.network.private_subnet_ids
  security_group_id = module.network.security_group_ids["gpu_node"]
  instance_profile  = module.iam.instance_profiles["gpu_node"]
  package           = "kiln[worker,aws]==${var.kiln_version}"
  settings          = local.settings
  secrets           = local.secrets.gpu_node
  kms_key_arn       = var.kms_key_arn
}
