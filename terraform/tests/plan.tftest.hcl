# Offline checks of what the modules plan, against a mocked AWS provider (no account, no
# network): `terraform test` from this directory after `terraform init -plugin-dir=...`.

mock_provider "aws" {
  override_data {
    target = data.aws_availability_zones.available
    values = { names = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"] }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_data "aws_ssm_parameter" {
    defaults = { value = "ami-0123456789abcdef0" }
  }
  mock_data "aws_secretsmanager_random_password" {
    defaults = { random_password = "mockedmockedmockedmockedmockedmockedmockedmocked" }
  }
  mock_resource "aws_db_instance" {
    defaults = {
      address            = "kiln.cluster.example.internal"
      master_user_secret = [{ secret_arn = "arn:aws:secretsmanager:us-east-1:111122223333:secret:rds", kms_key_id = "", secret_status = "active" }]
    }
  }
}

variables {
  name            = "kiln-test"
  region          = "us-east-1"
  kiln_version    = "0.9.0"
  domain_name     = "kiln.example.com"
  certificate_arn = "arn:aws:acm:us-east-1:111122223333:certificate/abc"
}

run "the_whole_platform_plans" {
  command = plan

  assert {
    condition     = output.settings.KILN_STREAM_REPLICAS == "3"
    error_message = "Kiln's streams must be replicated over the three NATS servers."
  }
  assert {
    condition     = output.store_url == "s3://kiln-test-store-us-east-1/kiln"
    error_message = "Code and snapshots belong in the bucket."
  }
  assert {
    condition     = length(split(",", output.nats_url)) == 3 && startswith(output.nats_url, "tls://")
    error_message = "Clients must know all three NATS servers, over TLS."
  }
  assert {
    condition     = output.settings.KILN_ENV == "production" && output.url == "https://kiln.example.com"
    error_message = "Production settings and the public URL."
  }
}

run "a_service_group_is_locked_down_and_drains" {
  command = plan
  module {
    source = "./modules/service"
  }
  variables {
    name                       = "kiln-test-gpu-ondemand"
    part                       = "invoker"
    user                       = "root"
    package                    = "kiln[worker,aws]==0.9.0"
    settings                   = { KILN_ENV = "production" }
    secrets                    = { kiln = "arn:kiln", nats_platform = "arn:nats" }
    ami_id                     = "ami-0123456789abcdef0"
    instance_type              = "g6e.xlarge"
    min_size                   = 1
    max_size                   = 4
    subnet_ids                 = ["subnet-a", "subnet-b", "subnet-c"]
    security_group_id          = "sg-gpu"
    instance_profile           = "kiln-test-gpu-node"
    warm_pool_size             = 2
    termination_hook_timeout_s = 360
  }

  assert {
    condition     = aws_launch_template.this.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 only: instance credentials must not be reachable without a token."
  }
  assert {
    condition     = aws_launch_template.this.block_device_mappings[0].ebs[0].encrypted == "true"
    error_message = "The node's disk (the snapshot cache) must be encrypted."
  }
  assert {
    condition     = aws_autoscaling_group.this.warm_pool[0].pool_state == "Stopped"
    error_message = "The warm pool keeps stopped instances: their EBS snapshot caches survive."
  }
  assert {
    condition     = aws_autoscaling_group.this.warm_pool[0].min_size == 2
    error_message = "The warm pool keeps the instances asked for."
  }
  assert {
    condition = (
      one(aws_autoscaling_group.this.initial_lifecycle_hook).lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
      && one(aws_autoscaling_group.this.initial_lifecycle_hook).heartbeat_timeout == 360
    )
    error_message = "A terminating GPU node must wait for its replicas to drain."
  }
  assert {
    condition     = strcontains(output.user_data, "ExecStart=/opt/kiln/bin/python -m kiln.invoker")
    error_message = "The host runs the node agent under systemd."
  }
}

run "the_data_tier_is_encrypted_and_replicated" {
  command = plan
  module {
    source = "./modules/data"
  }
  variables {
    subnet_ids                 = ["subnet-a", "subnet-b", "subnet-c"]
    database_security_group_id = "sg-db"
    redis_security_group_id    = "sg-redis"
    db_instance_class          = "db.t4g.micro"
    db_storage_gb              = 20
    redis_node_type            = "cache.t4g.micro"
    redis_auth_token           = "mockedmockedmockedmockedmockedmockedmockedmocked"
    bucket                     = "kiln-test-store"
    prefix                     = "kiln"
  }

  assert {
    condition     = aws_db_instance.postgres.storage_encrypted && aws_db_instance.postgres.multi_az
    error_message = "PostgreSQL must be encrypted and Multi-AZ."
  }
  assert {
    condition     = aws_db_instance.postgres.manage_master_user_password
    error_message = "RDS keeps the database password in Secrets Manager itself."
  }
  assert {
    condition = (
      aws_elasticache_replication_group.redis.transit_encryption_enabled
      && aws_elasticache_replication_group.redis.at_rest_encryption_enabled
      && aws_elasticache_replication_group.redis.automatic_failover_enabled
    )
    error_message = "Redis must speak TLS, be encrypted at rest and fail over."
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.store.rule).apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    error_message = "The bucket must encrypt what it stores."
  }
  assert {
    condition     = aws_s3_bucket_versioning.store.versioning_configuration[0].status == "Enabled"
    error_message = "The bucket must keep versions (a snapshot overwritten by mistake comes back)."
  }
  assert {
    condition     = aws_s3_bucket_public_access_block.store.restrict_public_buckets
    error_message = "The bucket must never be public."
  }
}

run "the_nats_cluster_spans_three_zones_on_its_own_volumes" {
  command = plan
  module {
    source = "./modules/nats"
  }
  variables {
    subnet_ids        = ["subnet-a", "subnet-b", "subnet-c"]
    subnet_cidrs      = ["10.40.128.0/20", "10.40.144.0/20", "10.40.160.0/20"]
    security_group_id = "sg-nats"
    instance_profile  = "kiln-test-nats"
    ami_id            = "ami-0123456789abcdef0"
    instance_type     = "m7i.large"
    jetstream_gb      = 100
    tls_secret_arn    = "arn:tls"
    server_secret_arn = "arn:server"
  }

  assert {
    condition     = length(aws_instance.server) == 3 && length(aws_ebs_volume.jetstream) == 3
    error_message = "Three servers, each with a JetStream volume."
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.jetstream : v.encrypted])
    error_message = "JetStream's volumes must be encrypted."
  }
  assert {
    condition     = alltrue([for s in aws_instance.server : s.metadata_options[0].http_tokens == "required"])
    error_message = "IMDSv2 only on the NATS servers."
  }
  assert {
    condition     = strcontains(aws_instance.server[0].user_data, "nats-route://10.40.144.10:6222") && strcontains(aws_instance.server[0].user_data, "KillSignal=SIGUSR2")
    error_message = "Each server routes to the others and stops in lame duck mode."
  }
  assert {
    condition     = output.url == "tls://10.40.128.10:4222,tls://10.40.144.10:4222,tls://10.40.160.10:4222"
    error_message = "The cluster's URL lists every server."
  }
}

run "security_groups_open_only_kilns_ports" {
  command = plan
  module {
    source = "./modules/network"
  }
  variables {
    cidr               = "10.40.0.0/16"
    availability_zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    monitoring_cidr    = "10.40.0.0/16"
    router_port        = 8000
  }

  assert {
    condition     = aws_vpc_security_group_ingress_rule.nats_cluster.from_port == 6222 && aws_vpc_security_group_ingress_rule.nats_cluster.to_port == 6222
    error_message = "NATS routes on 6222, between NATS servers only."
  }
  assert {
    condition     = toset(keys(aws_vpc_security_group_ingress_rule.database)) == toset(["router", "scheduler", "billing"])
    error_message = "PostgreSQL is for the routers, the schedulers and billing: never the GPU nodes."
  }
  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.database : r.from_port == 5432])
    error_message = "PostgreSQL's port only."
  }
  assert {
    condition     = alltrue([for r in aws_vpc_security_group_ingress_rule.https : r.from_port == 443 && r.to_port == 443])
    error_message = "The internet reaches the load balancer on 443 only."
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.router_from_alb.from_port == 8000
    error_message = "Routers take traffic from the load balancer on their port."
  }
  assert {
    condition     = aws_vpc_endpoint.s3.vpc_endpoint_type == "Gateway"
    error_message = "Snapshot traffic goes through the S3 gateway endpoint, not the NAT."
  }
}

run "a_gpu_family_that_is_not_one_is_refused" {
  command = plan
  module {
    source = "./modules/gpu_nodes"
  }
  variables {
    instance_type     = "m7i.large"
    min_size          = 0
    max_size          = 1
    subnet_ids        = ["subnet-a"]
    security_group_id = "sg"
    instance_profile  = "p"
    package           = "kiln"
    settings          = {}
    secrets           = { kiln = "a", nats_platform = "b" }
  }
  expect_failures = [var.instance_type]
}

run "min_above_max_is_refused" {
  command = plan
  variables {
    gpu_min = 5
    gpu_max = 2
  }
  expect_failures = [var.gpu_max]
}

run "a_single_scheduler_is_refused" {
  command = plan
  variables {
    scheduler_count = 1
  }
  expect_failures = [var.scheduler_count]
}
